"""Embed (and optionally caption) an image collection on a Ray cluster: `mmgem embed` / :func:`embed_collection`.

The collection's keys are split into parts of `part_size` images (in key order). Ray Data streams the pending
parts' keys through a pool of `concurrency` actors, each holding one model (`num_gpus` GPUs per actor, batches of
`batch_size` images, vectors from :func:`mmgem.embedding.encode_images`, so they equal the single-process path).
Each finished part is written in two layouts, every file atomically (a temporary name, then a rename):

    OUTPUT/embeddings/part-00000.parquet    id, image_path, text, caption, width, height, embedding (float32[D])
    OUTPUT/img_emb/img_emb_00000.npy        clip-retrieval's layout: float32 [n, D], rows as in metadata_00000
    OUTPUT/metadata/metadata_00000.parquet  image_path, caption, text, width, height
    OUTPUT/manifest.json                    the model, the dimension, the part size and the part count

A rerun skips the parts whose three files exist (an interrupted run resumes where it stopped); a rerun with another
model or part size is refused. `mmgem index --backend lancedb` and :func:`mmgem.scale.lance.load_embeddings` load
`embeddings/` without embedding again; autofaiss reads `img_emb/` + `metadata/`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmgem.cli import command_parser
from mmgem.embedding import caption, encode_images, load_image
from mmgem.errors import checking_user_input
from mmgem.loading import load_model
from mmgem.optional import require
from mmgem.scale.collection import ImageReader, list_keys
from mmgem.scale.lance import import_embeddings

DEFAULT_PART_SIZE = 10_000
DEFAULT_BATCH_SIZE = 32
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ layout
def part_files(output: Path, part: int) -> tuple[Path, Path, Path]:
    """(embeddings parquet, clip-retrieval npy, clip-retrieval metadata parquet) of one part."""
    return (
        output / "embeddings" / f"part-{part:05d}.parquet",
        output / "img_emb" / f"img_emb_{part:05d}.npy",
        output / "metadata" / f"metadata_{part:05d}.parquet",
    )


def part_done(output: Path, part: int) -> bool:
    return all(path.is_file() for path in part_files(output, part))


def _atomic(path: Path, write: Any) -> None:
    """Write through `write(temporary_path)`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise ValueError(f"Refusing to write through the symlink {path}.")
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_part(output: Path, part: int, rows: list[dict[str, Any]]) -> None:
    """The three files of a part, from its rows (sorted by key); the embeddings parquet last (it marks the part)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda row: row["id"])
    vectors = np.stack([row["embedding"] for row in rows]).astype(np.float32)
    columns = {name: [row.get(name) for row in rows] for name in ("image_path", "caption", "text", "width", "height")}
    embeddings_file, npy_file, metadata_file = part_files(output, part)
    _atomic(npy_file, lambda p: np.save(open(p, "wb"), vectors))
    _atomic(metadata_file, lambda p: pq.write_table(pa.table(columns), p))
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "id": [row["id"] for row in rows],
            **columns,
            "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        }
    )
    _atomic(embeddings_file, lambda p: pq.write_table(table, p))


def _check_manifest(output: Path, manifest: dict[str, Any]) -> None:
    """Create the manifest, or refuse to mix a different model or part size into an existing output."""
    path = output / MANIFEST
    if path.is_file():
        written = json.loads(path.read_text(encoding="utf-8"))
        for name in ("model", "part_size", "images"):
            if written.get(name) != manifest.get(name):
                raise ValueError(
                    f"`--output` {output} was written with {name}={written.get(name)!r}, not {manifest.get(name)!r}: "
                    "a rerun must use the same model, part size and collection (or another --output)."
                )
        return
    _atomic(path, lambda p: Path(p).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ the actor
class Embedder:
    """One Ray actor: a loaded MM-GEM that turns a batch of keys into vectors (and captions)."""

    def __init__(
        self, model: str, captions: bool = False, caption_tokens: int | None = None, threads: int | None = None
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.model, self.processor = load_model(model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.eval().to(self.device)
        self.captions, self.caption_tokens = captions, caption_tokens
        self.reader = ImageReader()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        keys = [str(key) for key in batch["id"]]
        loaded = [self.reader.read(key) for key in keys]
        images = [load_image(image) for image, _ in loaded]
        vectors = encode_images(self.model, self.processor, images, batch_size=len(images))
        out = {
            "id": np.array(keys, dtype=object),
            "part": batch["part"],
            "embedding": vectors.numpy(),
            "text": np.array([text for _, text in loaded], dtype=object),
            "width": np.array([image.width for image in images]),
            "height": np.array([image.height for image in images]),
        }
        if self.captions:
            length = {} if self.caption_tokens is None else {"max_new_tokens": self.caption_tokens}
            texts = caption(self.model, self.processor, images, batch_size=len(images), **length)
            out["caption"] = np.array(texts, dtype=object)
        return out


# ------------------------------------------------------------------------------------------------ the run
def _check_options(concurrency: int, num_gpus: float, batch_size: int, part_size: int) -> None:
    for name, value in (("concurrency", concurrency), ("batch_size", batch_size), ("part_size", part_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    if not isinstance(num_gpus, (int, float)) or num_gpus < 0:
        raise ValueError(f"`num_gpus` must be a number >= 0 (GPUs per actor); got {num_gpus!r}.")


def embed_collection(
    model: str | os.PathLike[str],
    images: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    concurrency: int = 1,
    num_gpus: float = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    part_size: int = DEFAULT_PART_SIZE,
    captions: bool = False,
    caption_tokens: int | None = None,
    threads_per_actor: int | None = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed the collection `images` with the MM-GEM folder `model` on Ray and write `output` (see the module doc).

    Connects to the running Ray (`ray.init()` first for a cluster; a local one is started otherwise).

    Args:
        concurrency: actors, each with its own model copy.
        num_gpus: GPUs per actor (0: CPU; 1: one GPU each; 0.5: two actors per GPU).
        batch_size: images per model call.
        part_size: images per output part (the unit written, and skipped on a rerun).
        captions: also write each image's generated caption.
        threads_per_actor: torch threads of each CPU actor (None: torch's default).

    Returns:
        {"parts": total parts, "written": parts written now, "skipped": parts found done, "images": embedded now,
        "seconds": wall time of the embedding, "dim": vector size}
    """
    with checking_user_input():
        _check_options(concurrency, num_gpus, batch_size, part_size)
        output = Path(output)
        if output.exists() and not output.is_dir():
            raise ValueError(f"`--output` {output} exists and is not a folder.")
        if not Path(model).is_dir():
            raise ValueError(f"`--model` must be a saved MM-GEM folder every Ray worker can read; got {model}.")
        keys = list_keys(str(images))
    model = str(Path(model).resolve())
    parts = [keys[start : start + part_size] for start in range(0, len(keys), part_size)]
    manifest = {
        "version": FORMAT_VERSION,
        "model": model,
        "part_size": part_size,
        "images": len(keys),
        "parts": len(parts),
        "captions": captions,
    }
    output.mkdir(parents=True, exist_ok=True)
    _check_manifest(output, manifest)
    pending = [index for index in range(len(parts)) if not part_done(output, index)]
    summary = {"parts": len(parts), "written": 0, "skipped": len(parts) - len(pending), "images": 0, "seconds": 0.0}
    if not pending:
        return summary

    ray = require("ray", "scale", "`mmgem embed` (Ray Data)")
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    rows = [{"id": key, "part": index} for index in pending for key in parts[index]]
    # Blocks of a few batches each, and at least two per actor, so every actor stays busy.
    blocks = max(-(-len(rows) // (4 * batch_size)), min(len(rows), 2 * concurrency))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model": model,
            "captions": captions,
            "caption_tokens": caption_tokens,
            "threads": threads_per_actor if not num_gpus else None,
        },
        concurrency=concurrency,
        num_gpus=num_gpus,
        batch_size=batch_size,
        batch_format="numpy",
    )
    buffers: dict[int, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    with tqdm(total=len(rows), desc="embedding", unit="img", disable=not progress) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for i, key in enumerate(batch["id"]):
                part = int(batch["part"][i])
                buffers.setdefault(part, []).append(
                    {
                        "id": str(key),
                        "image_path": str(key),
                        "embedding": batch["embedding"][i],
                        "text": batch["text"][i],
                        "width": int(batch["width"][i]),
                        "height": int(batch["height"][i]),
                        "caption": str(batch["caption"][i]) if "caption" in batch else batch["text"][i],
                    }
                )
                if len(buffers[part]) == len(parts[part]):  # a part is complete: write it now (resumable)
                    write_part(output, part, buffers.pop(part))
                    summary["written"] += 1
            bar.update(len(batch["id"]))
    summary["seconds"] = time.perf_counter() - start
    summary["images"] = len(rows)
    summary["dim"] = int(np.load(part_files(output, pending[0])[1], mmap_mode="r").shape[1])
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("embed", "Embed (and caption) an image collection on Ray Data with an actor pool.")
    parser.add_argument("--model", required=True, help="saved MM-GEM folder (every Ray worker must read it)")
    parser.add_argument(
        "--images", required=True, help="image folder, webdataset shards (.tar, {..}, folder) or parquet file/folder"
    )
    parser.add_argument("--output", required=True, help="output folder (created; a rerun skips written parts)")
    parser.add_argument("--concurrency", type=int, default=1, help="actors, each with a model copy")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (0: CPU)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per model call")
    parser.add_argument("--part-size", type=int, default=DEFAULT_PART_SIZE, help="images per output part")
    parser.add_argument("--captions", action="store_true", help="also write each image's generated caption")
    parser.add_argument("--caption-tokens", type=int, help="caption length limit (default: the model's)")
    parser.add_argument(
        "--lancedb", metavar="INDEX", help="then load the vectors into this LanceDB index (mmgem search)"
    )
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`mmgem embed ...`."""
    args = build_parser().parse_args(argv)
    if args.ray_address:
        ray = require("ray", "scale", "`mmgem embed` (Ray Data)")
        ray.init(address=args.ray_address, log_to_driver=False)
    summary = embed_collection(
        args.model,
        args.images,
        args.output,
        concurrency=args.concurrency,
        num_gpus=args.num_gpus,
        batch_size=args.batch_size,
        part_size=args.part_size,
        captions=args.captions,
        caption_tokens=args.caption_tokens,
        progress=not args.no_progress,
    )
    rate = summary["images"] / summary["seconds"] if summary["seconds"] else 0.0
    print(
        f"Embedded {summary['images']} images into {summary['written']} parts ({rate:.1f} images/s), skipped "
        f"{summary['skipped']} parts already written; {args.output} holds {summary['parts']} parts.",
        file=sys.stdout,
    )
    if args.lancedb:
        import_embeddings(args.output, args.lancedb)
        print(f"Loaded the vectors into the LanceDB index {args.lancedb} (mmgem search --index {args.lancedb}).")
    return 0
