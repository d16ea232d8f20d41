"""The web app: `mmgem app` (with an index) and the self-contained `app.py` of exported folders (`space_app`)."""
