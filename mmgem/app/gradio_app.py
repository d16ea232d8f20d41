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


def index_search_functions(search: Any) -> tuple[Any, Any]:
    """`search_text` and `search_region` callables for `build_demo`, over an `ImageSearch`."""
    from mmgem.app.space_app import draw_box
    from mmgem.search.sources import load_image

    def label(hit: Any) -> str:
        return f"{Path(hit.path.split('#')[-1]).name}  {hit.score:.3f}"

    def search_text(query: str, k: int, caption_weight: float) -> list[tuple[Image.Image, str]]:
        weight = caption_weight if search.has_captions else 0.0
        return [(load_image(hit.path), label(hit)) for hit in search.text(query, k=k, caption_weight=weight)]

    def search_region(image: Image.Image, box: Sequence[float], k: int) -> list[tuple[Image.Image, str]]:
        target = "regions" if search.store.count("region") else "images"
        hits = search.image(image, k=k, region=box, target=target)
        return [(draw_box(load_image(h.path), h.item["box"]) if h.item.get("box") else load_image(h.path), label(h))
                for h in hits]  # fmt: skip

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
    return build_demo(model, processor, *functions, title=f"MM-GEM: {Path(model_path).name}")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("app", __doc__)
    parser.add_argument("--model", required=True, help="MM-GEM folder or Hub id")
    parser.add_argument("--index", help="an index folder written by `mmgem index` (else: search uploaded images)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's 7860, or the next free one)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow Python code shipped in the --model folder to run")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`mmgem app ...`: serve until interrupted."""
    args = build_parser().parse_args(argv)
    with checking_user_input():
        if args.port is not None and not 0 < args.port < 65536:
            raise ValueError(f"`--port` must be in 1..65535; got {args.port}.")
        if args.index is not None and not (Path(args.index) / "meta.json").is_file():
            raise ValueError(f"`--index` {args.index} is not an mmgem index (no meta.json); see `mmgem index`.")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from mmgem.app.space_app import launch

    launch(create_demo(args.model, args.index, args.device, args.trust_remote_code), host=args.host, port=args.port)
    return 0
