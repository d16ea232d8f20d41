"""`mmgem app --model M [--index INDEX] [--host 127.0.0.1] [--port 7860]`: the web page of `space_app`, searching an
index built by `mmgem index` when one is given (text search, and region search over the index's grid regions).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mmgem.cli import command_parser
from mmgem.errors import checking_user_input

MISSING_COLOUR = (200, 200, 200)


def hit_item(hit: Any) -> tuple[Image.Image, str]:
    """A gallery item for a hit: the image (its matched box drawn), or when the indexed file cannot be read any
    more (moved, deleted, damaged) a grey tile whose label says so, so that one missing file spoils no search."""
    from mmgem.app.space_app import draw_box
    from mmgem.search.searcher import printable
    from mmgem.search.sources import load_image

    name = printable(Path(hit.path.split("#")[-1]).name)
    try:
        image = load_image(hit.path)
    except Exception as error:  # noqa: BLE001 - whatever happened to the file, the other hits still show
        file = hit.path.split("#", 1)[0] if "#" in hit.path else hit.path
        reason = "file not found" if not os.path.exists(file) else type(error).__name__
        return Image.new("RGB", (64, 64), MISSING_COLOUR), f"{name}  {hit.score:.3f}  (cannot be shown: {reason})"
    if hit.item.get("box"):
        image = draw_box(image, hit.item["box"])
    return image, f"{name}  {hit.score:.3f}"


def index_search_functions(search: Any) -> tuple[Any, Any]:
    """`search_text` and `search_region` callables for `build_demo`, over an `ImageSearch`."""

    def search_text(query: str, k: int, caption_weight: float) -> list[tuple[Image.Image, str]]:
        weight = caption_weight if search.has_captions else 0.0
        return [hit_item(hit) for hit in search.text(query, k=k, caption_weight=weight)]

    def search_region(image: Image.Image, box: Sequence[float], k: int) -> list[tuple[Image.Image, str]]:
        target = "regions" if search.store.count("region") else "images"
        return [hit_item(hit) for hit in search.image(image, k=k, region=box, target=target)]

    return search_text, search_region


def create_demo(
    model_path: str, index: str | None = None, device: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The page for a model folder (or Hub id), searching `index` if given."""
    import torch

    from mmgem.app.space_app import build_demo
    from mmgem.loading import load_model

    model, processor = load_model(model_path, trust_remote_code)
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    functions = (None, None)
    if index is not None:
        from mmgem.search import ImageSearch

        functions = index_search_functions(ImageSearch(index, model, processor))
    from mmgem.search.sources import load_image

    # Uploads are read as the index read its images (same loader, same frame, same caps).
    return build_demo(model, processor, *functions, title=f"MM-GEM: {Path(model_path).name}", load_image=load_image)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("app", __doc__)
    parser.add_argument("--model", required=True, help="MM-GEM folder or Hub id")
    parser.add_argument("--index", help="an index folder written by `mmgem index` (else: search uploaded images)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's 7860, or the next free one)")
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=None,
        help="largest upload in megabytes (default: $MMGEM_APP_MAX_UPLOAD_MB or 20)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow Python code shipped in the --model folder to run"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`mmgem app ...`: serve until interrupted."""
    args = build_parser().parse_args(argv)
    with checking_user_input():
        if args.port is not None and not 0 < args.port < 65536:
            raise ValueError(f"`--port` must be in 1..65535; got {args.port}.")
        if args.max_upload_mb is not None and not 0 < args.max_upload_mb <= 10_000:
            raise ValueError(f"`--max-upload-mb` must be in (0, 10000]; got {args.max_upload_mb}.")
        if args.index is not None and not (Path(args.index) / "meta.json").is_file():
            raise ValueError(f"`--index` {args.index} is not an mmgem index (no meta.json); see `mmgem index`.")
        from mmgem.loading import check_model_folder

        check_model_folder(args.model, "--model", args.trust_remote_code)  # before gradio and the model load
        if args.index is not None:
            from mmgem.search.indexer import require_search_extra

            require_search_extra("app --index")
    if args.max_upload_mb is not None:
        os.environ["MMGEM_APP_MAX_UPLOAD_MB"] = str(args.max_upload_mb)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from mmgem.app.space_app import launch

    launch(create_demo(args.model, args.index, args.device, args.trust_remote_code), host=args.host, port=args.port)
    return 0
