"""Embed an image folder or webdataset shards into an index folder (see `mmgem.search.store` for the format).

Command line::

    mmgem index --model M --images DIR_OR_SHARDS --output INDEX [--captions] [--region-grids 2,3] [--batch-size 32]

Per image the index holds its embedding (`image`), the embeddings of a grid of boxes (`region`: for each grid size
g in `--region-grids`, the g x g cells of the part of the image the model sees), and with `--captions` the text
embedding of the caption the model writes (`caption`), so a text query also matches what the model said about the
image. The vision tower runs once per image for all three. A rerun skips the images already in the index and adds
new ones; an interrupted run leaves the index as it was after its last complete batch.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmgem.cli import command_parser
from mmgem.errors import MMGEMUserError, checking_user_input
from mmgem.loading import load_model
from mmgem.optional import require
from mmgem.search.lance_store import export_store, new_folder
from mmgem.search.sources import ImageSource, iter_folder, iter_shards, resolve_images
from mmgem.search.store import VectorStore, faiss_threads
from modeling_mmgem.image_loading_mmgem import image_frame_transform

DEFAULT_REGION_GRIDS = (2,)
DEFAULT_BATCH_SIZE = 32
BACKENDS = ("faiss", "lancedb")
LANCE_ROWS = "rows"  # `--backend lancedb`: the FAISS-format rows the table is built from (resumable)
SAVE_ANN_EVERY_S = 120.0  # the ANN cache is rewritten at most this often (and at the end)


def model_fingerprint(model: Any, name_or_path: str) -> dict[str, Any]:
    """What identifies the embedding space of a model: a hash of its image and text projection weights (h1, h3),
    which any training changes and saving or reloading keeps; plus its name and the embedding size."""
    digest = hashlib.sha256(str(model.config.projection_dim).encode())
    for module in (model.image_projection, model.text_projection):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return {"name_or_path": name_or_path, "fingerprint": digest.hexdigest()[:16], "dim": model.config.projection_dim}


def grid_boxes(image_processor: Any, width: int, height: int, grids: Sequence[int]) -> list[list[float]]:
    """The cells of g x g grids over the part of a `width x height` image the model sees (after the crop), in pixels."""
    scale_x, scale_y, offset_x, offset_y, frame_w, frame_h = image_frame_transform(image_processor, width, height)
    left, top = offset_x / scale_x, offset_y / scale_y
    right, bottom = min(width, (offset_x + frame_w) / scale_x), min(height, (offset_y + frame_h) / scale_y)
    boxes = []
    for g in grids:
        xs = np.linspace(left, right, g + 1)
        ys = np.linspace(top, bottom, g + 1)
        boxes += [[float(xs[i]), float(ys[j]), float(xs[i + 1]), float(ys[j + 1])] for j in range(g) for i in range(g)]
    return boxes


@torch.no_grad()
def encode_batch(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    region_grids: Sequence[int] = (),
    captions: bool = False,
    max_new_tokens: int | None = None,
) -> tuple[torch.Tensor, list[list[list[float]]], torch.Tensor, list[str] | None, torch.Tensor | None]:
    """One vision pass: image embeddings [B, D], grid boxes, their region embeddings [sum R, D] (images' boxes in
    order), and optionally captions with their text embeddings [B, D]. All embeddings are L2-normalised."""
    boxes = [grid_boxes(processor.image_processor, im.width, im.height, region_grids) for im in images]
    inputs = processor(images=list(images), boxes=boxes if region_grids else None)
    pixel_values = inputs["pixel_values"].to(model.device)
    # The model's own steps, called once, so that the tower's feature map serves images, regions and captions.
    _, feature_map = model._vision_feature_map(pixel_values)
    regions = model._regions(pixel_values, inputs["boxes"]) if region_grids else None  # flattened, checked
    embeds, _ = model._visual_embeddings(feature_map, regions, include_images=True)  # [B + sum R, D]
    embeds = F.normalize(embeds.float(), dim=-1)
    image_embeds, region_embeds = embeds[: len(images)], embeds[len(images) :]
    caption_texts = caption_embeds = None
    if captions:
        visual_tokens = model._visual_tokens(feature_map, None, include_images=True)  # [B, K, H_lm]
        length = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}  # else the model's default
        generated = model.generate(visual_tokens=visual_tokens, do_sample=False, **length)
        caption_texts = processor.decode_captions(generated)
        text_inputs = processor(text=[t if t.strip() else "." for t in caption_texts], truncation=True).to(model.device)
        caption_embeds = F.normalize(model.get_text_features(**text_inputs).pooler_output.float(), dim=-1)
    return image_embeds, boxes, region_embeds, caption_texts, caption_embeds


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _rows_for_batch(
    sources: Sequence[ImageSource],
    images: Sequence[Any],
    processor: Any,
    model: Any,
    region_grids: Sequence[int],
    captions: bool,
    max_new_tokens: int | None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The vectors and items of a batch, grouped by file: image, its regions, its caption."""
    image_embeds, boxes, region_embeds, caption_texts, caption_embeds = encode_batch(
        model, processor, images, region_grids, captions, max_new_tokens
    )
    vectors, items, region_start = [], [], 0
    for i, (source, image) in enumerate(zip(sources, images)):
        base = {"path": source.path, "width": image.width, "height": image.height, **source.metadata}
        file_rows = 1 + len(boxes[i]) + int(captions)
        caption = caption_texts[i] if captions else None
        rows = [({"kind": "image", "caption": caption}, image_embeds[i])]
        for j, box in enumerate(boxes[i]):
            rows.append(({"kind": "region", "box": [round(v, 2) for v in box]}, region_embeds[region_start + j]))
        region_start += len(boxes[i])
        if captions:
            rows.append(({"kind": "caption", "caption": caption}, caption_embeds[i]))
        for fields, vector in rows:
            items.append({**base, **fields, "file_rows": file_rows})
            vectors.append(vector)
    return torch.stack(vectors).cpu().numpy(), items


def _check_options(batch_size: int, region_grids: Sequence[int], max_new_tokens: int | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`--batch-size` must be a positive int; got {batch_size!r}.")
    if any(not isinstance(g, int) or not 1 <= g <= 8 for g in region_grids):
        raise ValueError(f"`--region-grids` must be grid sizes from 1 to 8 (e.g. 2,3), or 0; got {region_grids}.")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"`--caption-tokens` must be a positive int; got {max_new_tokens}.")


def _open_or_create(output: Path, model_info: dict[str, Any], region_grids: Sequence[int], exact: bool) -> VectorStore:
    if not (output / "meta.json").is_file():
        return VectorStore.create(output, model_info["dim"], model_info, region_grids, exact=exact, argument="output")
    store = VectorStore(output, writable=True, repair=True, argument="output")
    built_with = store.meta["model"]
    if built_with.get("fingerprint") != model_info["fingerprint"]:
        store.close()
        raise MMGEMUserError(
            f"`--model` {model_info['name_or_path']} is not the model the index {output} was built with "
            f"({built_with.get('name_or_path')}); index with that model, or give a new `--output`."
        )
    if list(store.meta.get("region_grids", [])) != list(region_grids):
        store.close()
        check_output(output, region_grids)  # raises the error
    return store


def check_output(output: Path, region_grids: Sequence[int]) -> None:
    """`--output` problems found before the model loads: not an index, linked files, another writer, other grids."""
    if not (output / "meta.json").is_file():
        VectorStore.check_creatable(output, "output")
        return
    meta = VectorStore.check_writable(output, "output")
    if list(meta.get("region_grids", [])) != list(region_grids):
        raise MMGEMUserError(
            f"`--region-grids` {','.join(map(str, region_grids)) or 0} is not the index's "
            f"{','.join(map(str, meta.get('region_grids', []))) or 0}; pass that, or give a new "
            "`--output`."
        )


def stale_paths(store: VectorStore, sources: Sequence[ImageSource]) -> list[str]:
    """The indexed files of `sources` whose size or modification time changed since they were indexed."""
    indexed = {item["path"]: item for item in store.items if item["kind"] == "image"}
    stale = []
    for source in sources:
        item = indexed.get(source.path)
        if item is None or "mtime" not in source.metadata:
            continue
        if (item.get("bytes"), item.get("mtime")) != (source.metadata["bytes"], source.metadata["mtime"]):
            stale.append(source.path)
    return stale


def index_images(
    model: Any,
    processor: Any,
    images: str,
    output: str | Path,
    model_name: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    region_grids: Sequence[int] = DEFAULT_REGION_GRIDS,
    captions: bool = False,
    max_new_tokens: int | None = None,
    exact: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed the images of `images` (a folder or shards) into the index folder `output`, creating or extending it.

    Returns a summary: images added, skipped (already indexed), failed (unreadable, with reasons), rows, seconds.
    """
    _check_options(batch_size, region_grids, max_new_tokens)
    kind, locations = resolve_images(str(images))
    model_info = model_fingerprint(model, model_name or str(getattr(model.config, "_name_or_path", "")))
    with faiss_threads(1):
        return _index(
            model,
            processor,
            kind,
            locations,
            Path(output),
            model_info,
            batch_size,
            list(region_grids),
            captions,
            max_new_tokens,
            exact,
            progress,
        )


def _index(
    model: Any,
    processor: Any,
    kind: str,
    locations: list[str],
    output: Path,
    model_info: dict[str, Any],
    batch_size: int,
    region_grids: list[int],
    captions: bool,
    max_new_tokens: int | None,
    exact: bool,
    progress: bool,
) -> dict[str, Any]:
    store = _open_or_create(output, model_info, region_grids, exact)
    summary: dict[str, Any] = {
        "added": 0,
        "skipped": 0,
        "failed": [],
        "rows": 0,
        "repaired": store.repairs,
        "rebuilt_caches": store.rebuilt_anns,
        "reembedded": 0,
    }
    start = last_save = time.perf_counter()
    try:
        if kind == "folder":
            pending = [s for s in iter_folder(locations[0])]
            stale = stale_paths(store, pending)
            if stale:  # edited in place since indexed: their old rows go, and they are embedded again below
                store.remove_paths(stale)
                summary["reembedded"] = len(stale)
        done = store.paths()
        if kind == "folder":
            summary["skipped"] = sum(s.path in done for s in pending)
            pending = [s for s in pending if s.path not in done]
            total = len(pending)
        else:
            indexed = {item["path"]: item for item in store.items if item["kind"] == "image"}
            pending, total = iter_shards(locations, skip=indexed), None
        bar = tqdm(total=total, desc="Indexing images", unit="img", disable=not progress)
        for batch in _batched(pending, batch_size):
            loaded = []
            for source in batch:
                try:
                    loaded.append((source, source.load()))
                except Exception as error:  # noqa: BLE001 - one broken file must not stop the run
                    summary["failed"].append(f"{source.path}: {type(error).__name__}: {error}")
            replaced = [s.path for s, _ in loaded if s.replaces]
            if replaced:  # shard members whose content changed since indexed: their old rows go first
                store.remove_paths(replaced)
                summary["reembedded"] += len(replaced)
            if loaded:
                vectors, items = _rows_for_batch(
                    [s for s, _ in loaded],
                    [im for _, im in loaded],
                    processor,
                    model,
                    region_grids,
                    captions,
                    max_new_tokens,
                )
                store.append(vectors, items)
                summary["added"] += len(loaded)
                summary["rows"] += len(items)
            bar.update(len(batch))
            if time.perf_counter() - last_save > SAVE_ANN_EVERY_S:
                store.save_ann()
                last_save = time.perf_counter()
        bar.close()
        if kind == "shards":
            summary["skipped"] = len(done) - summary["reembedded"]
        store.save_ann()
    finally:
        store.close()
    summary["seconds"] = time.perf_counter() - start
    summary["total_rows"] = len(store.items)
    return summary


def require_search_extra(command: str, shards: bool = False) -> None:
    """Raise a one-line error naming `pip install "mmgem[search]"` when FAISS (or, for shards, webdataset) is
    missing: checked before the model loads."""
    for module in ("faiss", *(("webdataset", "braceexpand") if shards else ())):
        try:
            require(module, "search", f"`mmgem {command}`")
        except ImportError as error:
            raise MMGEMUserError(str(error)) from None


def parse_grids(text: str) -> list[int]:
    """`--region-grids`: "2,3" -> [2, 3]; "0" or "none" -> []."""
    if text.strip().lower() in ("0", "none", ""):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"`--region-grids` must be grid sizes such as 2,3 (or 0); got {text!r}.") from None


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("index", __doc__)
    parser.add_argument("--model", required=True, help="MM-GEM folder or Hub id")
    parser.add_argument("--images", required=True, help="image folder (recursive) or webdataset shards (.tar, {..})")
    parser.add_argument("--output", required=True, help="index folder (created, or extended on a rerun)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--captions", action="store_true", help="also caption each image and index the caption")
    parser.add_argument("--caption-tokens", type=int, help="caption length limit (default: the model's)")
    parser.add_argument(
        "--region-grids",
        default=",".join(map(str, DEFAULT_REGION_GRIDS)),
        help="grid sizes of the region boxes indexed per image, e.g. 2,3 (0: no regions)",
    )
    parser.add_argument("--exact", action="store_true", help="a flat (exact) FAISS index instead of HNSW")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="faiss",
        help="faiss, or lancedb (a LanceDB table; rows kept in OUTPUT/rows)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow Python code shipped in the --model folder to run"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`mmgem index ...`."""
    args = build_parser().parse_args(argv)
    with checking_user_input():
        grids = parse_grids(args.region_grids)
        _check_options(args.batch_size, grids, args.caption_tokens)
        require_search_extra("index")
        kind, _ = resolve_images(args.images)  # bad `--images` fails before the model loads
        require_search_extra("index", shards=kind == "shards")
        check_output(Path(args.output), grids)

    model, processor = load_model(args.model, args.trust_remote_code)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    rows = Path(args.output) / LANCE_ROWS if args.backend == "lancedb" else Path(args.output)
    if args.backend == "lancedb":
        with checking_user_input():
            new_folder(Path(args.output), keep=[LANCE_ROWS])  # what the LanceDB export will need, checked first
    summary = index_images(
        model.eval().to(device),
        processor,
        args.images,
        rows,
        model_name=name,
        batch_size=args.batch_size,
        region_grids=grids,
        captions=args.captions,
        max_new_tokens=args.caption_tokens,
        exact=args.exact,
        progress=not args.no_progress,
    )
    if args.backend == "lancedb":  # the rows (resumable, appended) go into a LanceDB table in OUTPUT
        export_store(rows, args.output, exact=args.exact, keep=[LANCE_ROWS])
    rate = summary["added"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    print(
        f"Indexed {summary['added']} new images ({rate:.1f} images/s), skipped {summary['skipped']} already "
        f"indexed, {len(summary['failed'])} unreadable; {args.output} holds {summary['total_rows']} vectors."
    )
    for failure in summary["failed"][:20]:
        print(f"  unreadable: {failure}", file=sys.stderr)
    if summary["repaired"]:
        print(
            f"Repaired {args.output}: dropped the rows of the damaged lines and of the images they belong to "
            "(those images found in --images were embedded again):",
            file=sys.stderr,
        )
        for problem in summary["repaired"][:20]:
            print(f"  {problem}", file=sys.stderr)
    if summary["rebuilt_caches"]:
        print(
            f"Rebuilt the ANN cache of {args.output} (unreadable or stale: {', '.join(summary['rebuilt_caches'])}).",
            file=sys.stderr,
        )
    if summary["reembedded"]:
        print(f"Embedded {summary['reembedded']} images again: changed since they were indexed.", file=sys.stderr)
    return 0
