"""Search an index by text, by image or by an image region: the Python API and `mmgem search`.

Python::

    from mmgem.search import ImageSearch
    search = ImageSearch("my-index")                      # loads the model the index was built with
    for hit in search.text("a red car", k=5):
        print(hit.path, hit.score)
    search.image("query.jpg")                             # images like this one
    search.image("query.jpg", region=(10, 20, 120, 90))   # images with a region like this box

Command line::

    mmgem search --index INDEX "a red car" [--k 10] [--json]
    mmgem search --index INDEX --image query.jpg [--region x0,y0,x1,y1] [--target images|regions|all]

Scores are cosine similarities. A text query scores each image by its image embedding and, when the index holds
captions, also by its caption's embedding: `(1 - caption_weight) * image + caption_weight * caption` (default
weight 0.5 when captions exist), computed exactly for the candidates the two ANN searches return.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmgem.cli import command_parser
from mmgem.embedding import encode_images, encode_regions, encode_texts
from mmgem.errors import MMGEMUserError, checking_user_input, one_line
from mmgem.loading import load_model
from mmgem.search.indexer import model_fingerprint, require_search_extra
from mmgem.search.lance_store import LanceStore, open_index
from mmgem.search.sources import load_image
from mmgem.search.store import Hit, VectorStore, faiss_threads, group_by_path

TARGETS = ("images", "regions", "all")
DEFAULT_CAPTION_WEIGHT = 0.5
CANDIDATE_FACTOR = 4  # each ANN returns k * this candidates before grouping by image


def check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MMGEMUserError(f"`k` must be a positive int (the number of results); got {k!r}.")


def check_region(region: Sequence[float], width: int, height: int) -> None:
    """Raise unless `region` (x0, y0, x1, y1) lies inside a `width x height` image with a positive area."""
    x0, y0, x1, y1 = (float(v) for v in region)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        box = ",".join(f"{v:g}" for v in region)
        raise MMGEMUserError(
            f"`region` {box} must lie inside the {width}x{height} query image, with x0 < x1 and y0 < y1 (pixels)."
        )


def check_text_options(store: VectorStore | LanceStore, caption_weight: float | None) -> float:
    """The caption weight of a text query (default: 0.5 with captions, else 0), checked against the index."""
    has_captions = store.count("caption") > 0
    weight = (DEFAULT_CAPTION_WEIGHT if has_captions else 0.0) if caption_weight is None else caption_weight
    if not 0.0 <= weight <= 1.0:
        raise MMGEMUserError(f"`caption_weight` must be in [0, 1]; got {caption_weight}.")
    if weight > 0 and not has_captions:
        raise MMGEMUserError(
            "`caption_weight` > 0 needs an index built with captions (`mmgem index --captions`); "
            "leave it out or pass 0."
        )
    return weight


def check_image_options(store: VectorStore | LanceStore, region: Sequence[float] | None, target: str | None) -> str:
    """The target of an image query (default: regions with a region, else images), checked against the index."""
    target = target or ("regions" if region is not None else "images")
    if target not in TARGETS:
        raise MMGEMUserError(f"`target` must be one of {TARGETS}; got {target!r}.")
    if target in ("regions", "all") and store.count("region") == 0:
        raise MMGEMUserError(
            "the index holds no regions (built with `--region-grids 0`): search it with "
            "`--target images`, or index with `--region-grids 2`."
        )
    return target


def load_query_image(path: str) -> Any:
    """The query image at `path`, read as the index reads its images; a ValueError naming `image` if unreadable."""
    try:
        return load_image(path)
    except (OSError, ValueError, SyntaxError) as error:  # PIL: UnidentifiedImageError is an OSError
        raise ValueError(f"`image` {path} is not a readable image ({one_line(error)}).") from None


def printable(path: str) -> str:
    """A path as a terminal can show it: bytes of a non-UTF-8 file name (kept as surrogates) as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def parse_box(text: str | Sequence[float]) -> tuple[float, float, float, float]:
    """`x0,y0,x1,y1` (pixels of the query image) -> a tuple of 4 floats."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4:
        raise ValueError(f"`--region` must be x0,y0,x1,y1 (4 numbers, pixels of the query image); got {text!r}.")
    return tuple(values)  # type: ignore[return-value]


class ImageSearch:
    """Text, image and region search over an index folder, with the model it was built with."""

    def __init__(
        self,
        index: str | os.PathLike[str] | VectorStore | LanceStore,
        model: Any = None,
        processor: Any = None,
        device: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        # the FAISS store, or LanceDB (mmgem.search.lance_store)
        self.store = index if isinstance(index, (VectorStore, LanceStore)) else open_index(index)
        index = self.store.folder
        built_with = self.store.meta["model"]
        if model is None:
            try:
                model, processor = load_model(built_with.get("name_or_path", ""), trust_remote_code)
            except (OSError, ValueError) as error:
                raise MMGEMUserError(
                    f"`index` {index} was built with the model {built_with.get('name_or_path')!r}, which cannot be "
                    f"loaded ({one_line(error)}); pass `model` (`--model`) with that model's folder."
                ) from None
            model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        if model_fingerprint(model, "")["fingerprint"] != built_with.get("fingerprint"):
            raise MMGEMUserError(
                f"`model` is not the model the index {index} was built with "
                f"({built_with.get('name_or_path')}); pass that model, or build an index with "
                "this one (`mmgem index`)."
            )
        self.model, self.processor = model.eval(), processor
        self._rows_by_path: dict[str, dict[str, int]] = {}
        for row, item in enumerate(self.store.items):
            if item["kind"] != "region":
                self._rows_by_path.setdefault(item["path"], {})[item["kind"]] = row

    @property
    def has_captions(self) -> bool:
        return self.store.count("caption") > 0

    # ------------------------------------------------------------------------------------------- embedding
    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length text embeddings [N, D]."""
        return encode_texts(self.model, self.processor, list(texts)).numpy()

    def embed_image(self, image: Any, region: Sequence[float] | None = None) -> np.ndarray:
        """The unit-length embedding [1, D] of an image (PIL, array or path), or of one `region` box of it."""
        if isinstance(image, (str, os.PathLike)):
            image = load_query_image(str(image))
        if region is None:
            return encode_images(self.model, self.processor, [image]).numpy()
        if hasattr(image, "width"):  # a PIL image (arrays are checked by the processor)
            check_region(region, image.width, image.height)
        return encode_regions(self.model, self.processor, [image], [[list(region)]]).numpy()

    # ------------------------------------------------------------------------------------------- search
    def vectors(self, query: np.ndarray, k: int = 10, target: str = "images", exact: bool = False) -> list[Hit]:
        """The `k` best images (one hit per image) for a query vector [D] among `target` rows."""
        check_k(k)
        if target not in TARGETS:
            raise MMGEMUserError(f"`target` must be one of {TARGETS}; got {target!r}.")
        kinds = {"images": ["image"], "regions": ["region"], "all": ["image", "region"]}[target]
        with faiss_threads(1):
            hits = [h for kind in kinds for h in self.store.search(query, kind, k * CANDIDATE_FACTOR, exact)[0]]
        return group_by_path(hits, k)

    def text(
        self, query: str, k: int = 10, caption_weight: float | None = None, target: str = "images", exact: bool = False
    ) -> list[Hit]:
        """The `k` images that best match a text (through their image embedding, and their caption if indexed)."""
        if not isinstance(query, str) or not query.strip():
            raise MMGEMUserError(f"the text query must be a non-empty string; got {query!r}.")
        check_k(k)
        weight = check_text_options(self.store, caption_weight)
        vector = self.embed_text([query])[0]  # [D]
        if weight == 0.0 or target != "images":
            return self.vectors(vector, k, target, exact)
        with faiss_threads(1):
            candidates = {
                h.path
                for kind in ("image", "caption")
                for h in self.store.search(vector, kind, k * CANDIDATE_FACTOR, exact)[0]
            }
        return sorted((self._fused_hit(path, vector, weight) for path in candidates), key=lambda h: -h.score)[:k]

    def _fused_hit(self, path: str, vector: np.ndarray, weight: float) -> Hit:
        rows = self._rows_by_path[path]
        image_score = float(self.store.vectors[rows["image"]] @ vector)
        caption_score = float(self.store.vectors[rows["caption"]] @ vector) if "caption" in rows else image_score
        item = {**self.store.items[rows["image"]], "image_score": image_score, "caption_score": caption_score}
        return Hit(rows["image"], (1 - weight) * image_score + weight * caption_score, item)

    def image(
        self,
        image: Any,
        k: int = 10,
        region: Sequence[float] | None = None,
        target: str | None = None,
        exact: bool = False,
    ) -> list[Hit]:
        """The `k` images most like an image, or with `region` like that box of it (default target: regions)."""
        check_k(k)
        target = check_image_options(self.store, region, target)
        return self.vectors(self.embed_image(image, region)[0], k, target, exact)


# ------------------------------------------------------------------------------------------------ command line
def hit_record(hit: Hit) -> dict[str, Any]:
    """The JSON form of a hit: path, score, kind, and box / caption where the item has them."""
    record = {"path": hit.path, "score": round(hit.score, 6), "kind": hit.item["kind"]}
    for key in ("box", "caption", "image_score", "caption_score", "text"):
        if hit.item.get(key) is not None:
            record[key] = hit.item[key]
    return record


def format_hits(hits: Sequence[Hit]) -> str:
    """A plain-text table: rank, score, path (and the matched box for region hits)."""
    lines = [f"{'rank':>4}  {'score':>7}  path", f"{'-' * 4}  {'-' * 7}  {'-' * 40}"]
    for rank, hit in enumerate(hits, 1):
        box = hit.item.get("box")
        where = f"  box {','.join(f'{v:g}' for v in box)}" if box else ""
        lines.append(f"{rank:>4}  {hit.score:7.4f}  {printable(hit.path)}{where}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("search", __doc__)
    parser.add_argument("query", nargs="?", help="the text to search for")
    parser.add_argument("--index", required=True, help="an index folder written by `mmgem index`")
    parser.add_argument("--image", help="search with this image instead of a text")
    parser.add_argument("--region", help="with --image: x0,y0,x1,y1 box (pixels) to search with")
    parser.add_argument("--target", choices=TARGETS, help="rows to match: whole images, indexed regions, or both")
    parser.add_argument("--k", "-k", type=int, default=10, help="number of results (default 10)")
    parser.add_argument("--caption-weight", type=float, help="text queries: weight of caption similarity (0..1)")
    parser.add_argument("--exact", action="store_true", help="score every vector instead of the ANN")
    parser.add_argument("--model", help="the model folder, if it moved since indexing")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow Python code shipped in the --model folder to run"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or `--image` (not both).")
    if args.region is not None and args.image is None:
        raise ValueError("`--region` needs `--image`.")
    if args.image is not None and not Path(args.image).is_file():
        raise ValueError(f"`--image` file does not exist: {args.image}.")
    if args.k < 1:
        raise ValueError(f"`--k` must be a positive int; got {args.k}.")
    if not (Path(args.index) / "meta.json").is_file():
        raise ValueError(f"`--index` {args.index} is not an mmgem index (no meta.json); build one with `mmgem index`.")


def main(argv: Sequence[str] | None = None) -> int:
    """`mmgem search ...`."""
    args = build_parser().parse_args(argv)
    with checking_user_input():
        _check_args(args)
        require_search_extra("search")
        region = parse_box(args.region) if args.region is not None else None
        query_image = load_query_image(args.image) if args.image is not None else None
        if region is not None:
            check_region(region, query_image.width, query_image.height)
        store = open_index(args.index)  # a damaged index, or options it cannot answer, fail before the model loads
        if query_image is not None:
            check_image_options(store, region, args.target)
        else:
            check_text_options(store, args.caption_weight)
    model = processor = None
    if args.model:
        model, processor = load_model(args.model, args.trust_remote_code)
    search = ImageSearch(store, model, processor, args.device, args.trust_remote_code)
    if query_image is not None:
        hits = search.image(query_image, k=args.k, region=region, target=args.target, exact=args.exact)
    else:
        hits = search.text(
            args.query, k=args.k, caption_weight=args.caption_weight, target=args.target or "images", exact=args.exact
        )
    print(json.dumps([hit_record(h) for h in hits], indent=2) if args.json else format_hits(hits))
    return 0
