"""`mmgem evaluate --benchmark NAME [NAME ...] --data-dir DIR [DIR ...]`: the standard benchmarks from local copies.

Prints the tables in the papers' column layout and writes every metric to `--output` (JSON). See
`mmgem.evaluation.benchmarks` for the benchmarks, their layouts and metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmgem.errors import checking_user_input
from mmgem.evaluation.benchmarks import BENCHMARKS, BenchmarkOptions, format_benchmark_tables, load_benchmark
from mmgem.evaluation.tasks import EmbeddingCache, run_tasks
from mmgem.files import write_json_atomic


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--benchmark` options of `mmgem evaluate`."""
    group = parser.add_argument_group("standard benchmarks (instead of --data)")
    group.add_argument("--benchmark", nargs="+", choices=sorted(BENCHMARKS), help="benchmarks to run")
    group.add_argument("--data-dir", nargs="+", help="each benchmark's folder in its published layout (in order)")
    group.add_argument("--split", help="benchmark split (default: test; imagenet val; refcocog val)")
    group.add_argument("--classes", help="zero-shot class names: JSON list, {folder: name}, or one per line")
    group.add_argument("--limit", type=int, help="first N images/regions only (a quick check, not comparable)")
    group.add_argument("--cache-dir", help="keep embeddings and generated captions here across runs")


def run_benchmark_command(args: argparse.Namespace) -> int:
    """Load every benchmark (all checked before the model runs), evaluate, print the tables, write the JSON."""
    import torch

    from mmgem.loading import load_model

    # Every benchmark is read and the model loaded before any work: a mistake is one line (`mmgem.cli`).
    with checking_user_input():
        directories = args.data_dir or []
        if len(directories) != len(args.benchmark):
            raise ValueError(
                f"`--data-dir` needs one folder per `--benchmark` ({len(args.benchmark)}); got {len(directories)}."
            )
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"`--limit` must be a positive int; got {args.limit}.")
        templates = None
        if args.templates:
            if len(args.templates) != 1 or not Path(args.templates[0]).is_file():
                raise ValueError(
                    "with `--benchmark`, `--templates` is one file of templates (JSON list or one per line)."
                )
            templates = args.templates[0]
        options = BenchmarkOptions(split=args.split, limit=args.limit, classes=args.classes, templates=templates)
        tasks = [load_benchmark(name, folder, options) for name, folder in zip(args.benchmark, directories)]
        model, processor = load_model(args.model, args.trust_remote_code)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = EmbeddingCache(
        model.to(device),
        processor,
        args.cache_dir,
        args.batch_size,
        not args.no_progress,
        args.max_new_tokens,
        args.num_beams,
    )
    metrics: dict[str, Any] = run_tasks(tasks, cache)
    if args.limit:
        metrics["limit"] = args.limit
    print(format_benchmark_tables(metrics, model_name=Path(args.model).name or args.model))
    if args.output:
        print(f"Wrote {write_json_atomic(args.output, metrics, sort_keys=True)}")
    return 0
