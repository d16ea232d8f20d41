"""How fast the demo trains under different settings: images per second of stage 2, side by side in one run.

The demo's model (the `demo` preset) and data, trained by the demo's own `train_stages`, under the settings of one
comparison (`--compare`):

- `precision` (default): fp32 with the model's own attention (SDPA); fp32 with eager attention; the two towers
  under bf16 autocast (`tower_autocast_dtype`) with eager attention (the demo's setting) or with SDPA; the whole
  model under bf16 autocast (the Trainer's `bf16`) with eager attention.
- `processes`: one process with all the threads; as many processes as threads (gloo DDP, one thread each) at the
  same global batch; the same processes at the per-process batch of the first (twice the global batch).

    python benchmarks/demo_speed.py                        # precision: 60 stage-2 steps per run, 2 rounds
    python benchmarks/demo_speed.py --compare processes --quick    # 15 steps, 1 round

The configurations run interleaved, round after round; the table gives each one's median images per second of
stage 2 (the Trainer's own `train_runtime`: process start and model loading left out) and the ratio to the first.
Results: `--output` (default `benchmarks/results/demo-speed-COMPARISON/`) `results.json` and `table.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mmgem` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm.auto import tqdm

from mmgem.demo import DemoConfig, prepare_data, train_stages
from mmgem.files import write_json_atomic, write_text_atomic

COMPARISONS = ("precision", "processes")


def configurations(compare: str, threads: int, batch_size: int) -> dict[str, dict[str, Any]]:
    """The compared settings of `compare`, by name: DemoConfig fields."""
    if compare == "processes":
        return {
            f"1 process x {threads} threads, {batch_size} images a step": dict(processes=1, batch_size=batch_size),
            f"{threads} processes x 1 thread, {batch_size} images a step": dict(
                processes=threads, batch_size=batch_size
            ),
            f"{threads} processes x 1 thread, {batch_size * threads} images a step": dict(
                processes=threads, batch_size=batch_size * threads
            ),
        }
    return {
        "fp32, SDPA attention": dict(tower_autocast_dtype=None, attn_implementation=None),
        "fp32, eager attention": dict(tower_autocast_dtype=None, attn_implementation="eager"),
        "towers bf16, eager attention (the demo)": dict(tower_autocast_dtype="bfloat16", attn_implementation="eager"),
        "towers bf16, SDPA attention": dict(tower_autocast_dtype="bfloat16", attn_implementation=None),
        "whole model bf16 (Trainer bf16), eager attention": dict(
            tower_autocast_dtype=None, attn_implementation="eager", train_overrides=dict(bf16=True, use_cpu=True)
        ),
    }


def stage2_images_per_second(config: DemoConfig, workdir: Path) -> float:
    """Train the demo's two stages with `config` in `workdir`; stage 2's images per second."""
    data = prepare_data(config, workdir / "data")
    _, _, histories = train_stages(config, data["train"], workdir)
    summary = next(row for row in reversed(histories["stage 2"]) if "train_runtime" in row)
    return config.stage2_steps * config.batch_size / float(summary["train_runtime"])


def run(
    compare: str, steps: int, rounds: int, threads: int, batch_size: int, num_train: int, workdir: Path
) -> dict[str, Any]:
    settings = configurations(compare, threads, batch_size)
    measured: dict[str, list[float]] = {name: [] for name in settings}
    with tqdm(total=rounds * len(settings), desc="demo training runs", unit="run") as bar:
        for round_index in range(rounds):
            names = list(settings) if round_index % 2 == 0 else list(reversed(settings))  # alternate the order
            for name in names:
                fields = dict(num_train=num_train, num_val=8, num_test=8, threads=threads, batch_size=batch_size)
                config = DemoConfig(**{**fields, "stage1_steps": 2, "stage2_steps": steps, **settings[name]})
                measured[name].append(stage2_images_per_second(config, workdir / f"run-{round_index}-{bar.n}"))
                bar.update(1)
    baseline = statistics.median(next(iter(measured.values())))
    rows = [
        {
            "configuration": name,
            "settings": settings[name],
            "images_per_s": statistics.median(values),
            "runs": values,
            "ratio_to_first": statistics.median(values) / baseline,
        }
        for name, values in measured.items()
    ]
    return {
        "compare": compare,
        "stage2_steps": steps,
        "rounds": rounds,
        "threads": threads,
        "num_train": num_train,
        "rows": rows,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Stage 2 of the demo ({results['compare']}), {results['stage2_steps']} steps, median of "
        f"{results['rounds']} runs ({results['threads']} threads in all)",
        "",
        "| configuration | images / s | ratio to the first |",
        "|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['configuration']} | {row['images_per_s']:.0f} | {row['ratio_to_first']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=COMPARISONS, default="precision", help="which settings to compare")
    parser.add_argument("--steps", type=int, default=60, help="stage-2 steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (the demo's default: 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="images a step (of the one-process run)")
    parser.add_argument("--num-train", type=int, default=2000, help="training images drawn for the runs")
    parser.add_argument("--quick", action="store_true", help="15 steps, 1 round")
    parser.add_argument("--output", help="folder for the results (default benchmarks/results/demo-speed-COMPARE)")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "threads", "batch_size", "num_train"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int")
    if args.compare == "processes" and args.threads < 2:
        parser.error("--threads must be at least 2 with --compare processes")
    steps, rounds = (15, 1) if args.quick else (args.steps, args.rounds)
    with tempfile.TemporaryDirectory(prefix="mmgem-demo-speed-") as workdir:
        results = run(args.compare, steps, rounds, args.threads, args.batch_size, args.num_train, Path(workdir))
    output = Path(args.output or f"benchmarks/results/demo-speed-{args.compare}")
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "results.json", results)
    write_text_atomic(output / "table.md", table(results))
    print(table(results))
    print(json.dumps({row["configuration"]: round(row["ratio_to_first"], 3) for row in results["rows"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
