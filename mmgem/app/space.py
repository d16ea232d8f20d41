"""The files that let an exported model folder run the web app as a Hugging Face Space: `app.py` (a copy of
`mmgem.app.space_app`, which imports only torch, transformers, gradio, PIL and numpy) and `requirements.txt`.
The model card's metadata gets the Space keys (`sdk`, `sdk_version`, `app_file`) from `space_card_metadata`.
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

APP_SOURCE = Path(__file__).with_name("space_app.py")
MIN_GRADIO = "6.31.0"  # the release the app is tested with (setup.py's `app` extra)
REQUIREMENTS = ("torch", "transformers>=5.18.0,<6", "pillow", "numpy")


def gradio_version() -> str:
    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError:
        return MIN_GRADIO


def space_card_metadata() -> dict[str, str]:
    """The model card keys a Space reads: which SDK, its version, and the file to run."""
    return {"sdk": "gradio", "sdk_version": gradio_version(), "app_file": "app.py"}


def write_space_files(folder: str | Path) -> list[Path]:
    """Write `app.py` and `requirements.txt` into an exported folder; returns the paths written."""
    folder = Path(folder)
    app = folder / "app.py"
    shutil.copyfile(APP_SOURCE, app)
    requirements = folder / "requirements.txt"
    lines = [*REQUIREMENTS, f"gradio>={MIN_GRADIO}"]
    requirements.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return [app, requirements]
