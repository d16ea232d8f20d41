"""Does the data pipeline keep up with the model? Images/s decoded and preprocessed per DataLoader worker from
webdataset shards, beside the images/s one training step consumes, for each model size.

    python -m benchmarks.data_pipeline                              # CPU: sizes tiny and small
    python -m benchmarks.data_pipeline --sizes paper --device cuda --dtype bfloat16   # on a GPU machine

The shards are written first, in img2dataset's layout (`<key>.jpg` of web-like size, `<key>.txt`), into a temporary
folder. The pipeline is the training one: `mmgem.data.sources.StreamingImageTextDataset` (webdataset reading, JPEG
decoding, record checks) and the `MMGEMCollator` (the processor's resize, crop, normalisation and tokenisation),
both in the DataLoader worker. "Per worker" is one worker's rate (measured with `num_workers=1`, after warm-up);
"with N workers" is the loader's rate with `--workers` of them. The model side is a full training step (forward,
backward, AdamW) of a random-weight model of that size (`benchmarks.sizes`) on one batch, so
`workers needed = model images/s / per-worker images/s` is how many workers each training process needs.
Writes `data_pipeline.json` and `data_pipeline.md` into `--output`.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.sizes import SIZES, build_bench_model
from benchmarks.timing import synchronize
from mmgem.data.collator import MMGEMCollator
from mmgem.data.formats import SourceOptions
from mmgem.data.formats.shards import WebDatasetSource
from mmgem.data.sources import StreamingImageTextDataset

WEB_IMAGE_SIZE = (512, 384)  # a typical CC3M / CC12M image after img2dataset (no resize)


def write_web_shards(folder: Path, count: int, per_shard: int, seed: int = 0) -> str:
    """`count` JPEG images of web size with captions in img2dataset's layout; returns the brace pattern."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards = math.ceil(count / per_shard)
    width, height = WEB_IMAGE_SIZE
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as writer:
            for index in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                # Smooth gradients plus noise: JPEG sizes (~40-60 KB) and decode cost close to photographs'.
                base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.random((1, 1, 3))
                noise = rng.normal(0, 24, (height, width, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                writer.write({"__key__": f"{index:09d}", "jpg": buffer.getvalue(), "txt": f"a web image {index}"})
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def pipeline_loader(pattern: str, processor: Any, batch_size: int, workers: int) -> DataLoader:
    """The training input pipeline: streaming records -> collator, in `workers` DataLoader workers."""
    source = WebDatasetSource(pattern, SourceOptions(resampled=True, shuffle_buffer=100))
    dataset = StreamingImageTextDataset([source], with_regions=False, epochs=None)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=MMGEMCollator(processor, stage=1),
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,
    )


def images_per_second(loader: DataLoader, batch_size: int, warmup: int, batches: int) -> float:
    """Images/s the loader delivers after `warmup` batches (worker start-up and first shard opens excluded)."""
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - start
    del stream  # stops the workers before the next measurement
    gc.collect()
    return batches * batch_size / elapsed


def training_step_rate(bench: Any, batch_size: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per training step, images/s) of forward + backward + AdamW on one batch of the model's size."""
    model, processor = bench.model.train(), bench.processor
    images = [Image.new("RGB", WEB_IMAGE_SIZE, (i * 20 % 255, 90, 160)) for i in range(batch_size)]
    batch = processor(images=images, text=[f"a web image {i} " * 4 for i in range(batch_size)]).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    step()  # warm-up (allocations, kernels)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, batch_size / seconds


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmgem-pipeline-") as folder:
        pattern = write_web_shards(Path(folder) / "shards", args.images, per_shard=max(1, args.images // 8))
        for name in args.sizes:
            spec = SIZES[name]
            bench = build_bench_model(spec, device, dtype)
            # The model first: the loaders' workers must not compete with its step for the cores.
            step_seconds, consumed = training_step_rate(bench, args.batch_size, args.steps, device)
            per_worker = images_per_second(
                pipeline_loader(pattern, bench.processor, args.batch_size, 1), args.batch_size, 2, args.batches
            )
            together = images_per_second(
                pipeline_loader(pattern, bench.processor, args.batch_size, args.workers),
                args.batch_size,
                2,
                args.batches,
            )
            rows.append(
                {
                    "size": name,
                    "model": spec.describe(),
                    "image_px": spec.vision["image_size"],
                    "pipeline_images_per_s_per_worker": per_worker,
                    "workers": args.workers,
                    f"pipeline_images_per_s_with_{args.workers}_workers": together,
                    "train_step_s": step_seconds,
                    "train_batch": args.batch_size,
                    "model_images_per_s": consumed,
                    "workers_needed": consumed / per_worker,
                }
            )
            del bench
    return rows


def table(rows: list[dict[str, Any]], workers: int) -> str:
    lines = [
        f"| size | image px | pipeline img/s per worker | pipeline img/s, {workers} workers | train step (batch) | "
        "model img/s | workers needed |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['image_px']} | {row['pipeline_images_per_s_per_worker']:.0f} | "
            f"{row[f'pipeline_images_per_s_with_{workers}_workers']:.0f} | {1000 * row['train_step_s']:.0f} ms "
            f"({row['train_batch']}) | {row['model_images_per_s']:.1f} | {row['workers_needed']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], help="benchmarks.sizes names")
    parser.add_argument("--images", type=int, default=256, help="images written to the shards")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12, help="batches timed per pipeline measurement")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed per size")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the 'together' measurement")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--output", default="benchmarks/results/data-pipeline")
    args = parser.parse_args(argv)
    rows = measure(args)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "load_average": os.getloadavg(),
    }
    (output / "data_pipeline.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    text = table(rows, args.workers)
    (output / "data_pipeline.md").write_text(text + "\n")
    print(text)
    print(f"machine: {machine}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
