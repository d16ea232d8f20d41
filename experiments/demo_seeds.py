"""`make demo` with three seeds, one after another, as a user runs it: do all of them meet the targets in time?

    python -m experiments.demo_seeds --output-dir demo-seeds              # seeds 0 1 2, about half an hour
    python -m experiments.demo_seeds --output-dir demo-seeds --seeds 3 4

Each seed runs `python -m mmgem.demo --seed S` in a fresh process with the demo's defaults (held-out test split,
2 torch threads); its wall time is measured around the whole process (imports, data, training, evaluation, export,
reload). Writes `docs/demo/seeds.json`, shown by `python -m mmgem.results`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from mmgem.demo import TARGETS, WALL_TIME_TARGET_S

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "demo" / "seeds.json"


def run_seed(seed: int, output_dir: Path, quick: bool = False) -> dict:
    """One `python -m mmgem.demo` run; its metrics, targets and timings, and the wall time of the process."""
    folder = output_dir / f"seed{seed}"
    command = [sys.executable, "-m", "mmgem.demo", "--seed", str(seed), "--output-dir", str(folder), "--no-progress"]
    command += ["--quick"] if quick else []
    began = time.perf_counter()
    with (output_dir / f"seed{seed}.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=log)
    wall_s = time.perf_counter() - began
    if done.returncode:
        raise RuntimeError(f"Seed {seed} failed (exit {done.returncode}); see {output_dir / f'seed{seed}.log'}.")
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "seed": seed,
        "metrics": {key: summary["metrics"][key] for key in TARGETS},
        "targets_met": all(target["met"] for target in summary["targets"].values()),
        "process_wall_s": wall_s,
        "timings": summary["timings"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo_seeds", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True, help="one demo output folder per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--results", default=str(OUTPUT), help=f"where the JSON goes (default {OUTPUT})")
    parser.add_argument("--quick", action="store_true", help="the demo's smoke run (`--quick`): checks the wiring")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if any(seed < 0 for seed in args.seeds):
        raise SystemExit(f"error: --seeds must be non-negative ints; got {args.seeds}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_seed(seed, output_dir, args.quick) for seed in tqdm(args.seeds, desc="seeds")]
    record = {
        "command": "python -m mmgem.demo --seed S" + (" --quick" if args.quick else ""),
        "eval_split": "test",
        "wall_time_target_s": WALL_TIME_TARGET_S,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "runs": runs,
    }
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    met = sum(run["targets_met"] and run["process_wall_s"] <= WALL_TIME_TARGET_S for run in runs)
    print(f"{met} of {len(runs)} seeds met every target within {WALL_TIME_TARGET_S / 60:.0f} minutes; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
