"""Reproduce MM-GEM's claims in miniature on the synthetic shapes data, and write experiments/REPORT.md.

    python -m experiments.run                 # `make experiments`: every arm, three seeds (~45 min on 2 quiet cores)
    python -m experiments.run --quick         # one seed, shorter training (~10 min): a smoke run, no conclusions
    python -m experiments.run --budget micro --output-dir /tmp/x --report-dir /tmp/x   # the test's seconds-long run

Arms (see `experiments.settings`): joint vs embedding-only vs caption-only (claim 1); pool grids 1x1, 2x2, 4x4 and
the full 8x8 grid (claim 2); stage 1 continued vs stage 2 from the same stage-1 model (claim 3); MM-GEM vs a 77-token
CLIP on long descriptions, in a "strict" and a "mild" variant (claim 4). Trained models are deleted after their
evaluation; per-seed results stay under `--output-dir` (results/<arm>/seed<k>.json) and a rerun with the same
settings reuses them (`--fresh` retrains everything).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .report import write_report
from .runner import TaskRunner, long_caption_visibility, prepare_datasets, run_task_in_worker
from .settings import BUDGETS, CLIP_CONTEXT, LONG_VARIANTS, Task, arms_for, experiment_architecture, tasks_for

PACKAGE_DIR = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick budget (same as --budget quick)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default=None, help="full (default), quick or micro")
    parser.add_argument("--output-dir", help="work folder: data, results (default experiments/runs/<budget>)")
    parser.add_argument(
        "--report-dir",
        help="where REPORT.md, results.json and figures/ go (default: experiments/ for the full "
        "budget, else the output dir)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="evaluation split (development runs use val; the report's numbers come from test)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="tasks run in parallel worker processes (1: one after another in this "
        "process); small models use two cores better as two single-threaded tasks than as one two-threaded task",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per task (default cores / jobs)")
    parser.add_argument(
        "--only-objectives",
        action="store_true",
        help="claim 1 alone: the joint, embedding-only and caption-only "
        "stage-1 arms, a table and objectives.json in the output dir (REPORT.md is not rewritten)",
    )
    parser.add_argument("--steps-scale", type=int, default=1, help="with --only-objectives: stage-1 steps x N")
    parser.add_argument("--seeds", type=int, nargs="+", help="with --only-objectives: these seeds (default all)")
    parser.add_argument("--fresh", action="store_true", help="retrain everything instead of reusing results")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    if args.quick and args.budget not in (None, "quick"):
        raise ValueError(f"`--quick` contradicts `--budget {args.budget}`.")
    if args.jobs < 1:
        raise ValueError(f"`--jobs` must be >= 1; got {args.jobs}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"`--threads` must be >= 1; got {args.threads}.")
    if args.steps_scale < 1:
        raise ValueError(f"`--steps-scale` must be >= 1; got {args.steps_scale}.")
    if (args.steps_scale != 1 or args.seeds) and not args.only_objectives:
        raise ValueError("`--steps-scale` and `--seeds` apply to `--only-objectives` runs only.")


# ---------------------------------------------------------------------------------------------------------- context
def environment() -> dict[str, Any]:
    """Machine, load and versions, for the report."""
    import numpy
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = float("nan")

    def git(*command: str) -> str:
        try:
            return subprocess.run(
                ["git", *command], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        import accelerate

        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = "n/a"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate_version,
        "numpy": numpy.__version__,
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def children_cpu_seconds() -> float:
    """CPU seconds of finished child processes (the workers of `--jobs` > 1)."""
    try:
        import resource  # Unix only

        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
    except (ImportError, OSError):
        return 0.0


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------------------- running
Results = dict[str, dict[int, dict[str, Any]]]


def run_tasks(
    budget: Any,
    output: Path,
    datasets: dict[str, Path],
    jobs: int,
    threads: int,
    fresh: bool,
    progress: bool,
    split: str,
    tasks: list[Task] | None = None,
) -> tuple[Results, list[dict[str, Any]]]:
    """Run every task of the budget (or `tasks`); returns `{arm: {seed: result}}` and a log of task durations."""
    runner = TaskRunner(budget, output, datasets, threads, progress, split)
    tasks = tasks if tasks is not None else tasks_for(budget, runner.spec)
    if fresh:
        for task in tasks:
            for arm in runner.produced_arms(task):
                runner.result_path(arm, task.seed).unlink(missing_ok=True)
    results: Results = {}
    log: list[dict[str, Any]] = []
    start = time.perf_counter()

    def record(task: Any, produced: dict[str, dict[str, Any]], seconds: float, cached: bool) -> None:
        for arm, result in produced.items():
            results.setdefault(arm, {})[task.seed] = result
        log.append({"task": task.key, "seconds": round(seconds, 1), "cached": cached})
        elapsed = time.perf_counter() - start
        state = "cached" if cached else f"{seconds:.0f} s"
        print(f"[{len(log)}/{len(tasks)}] {task.key}: {state} (elapsed {elapsed / 60:.1f} min)", flush=True)

    pending = []
    for task in tasks:
        cached = runner.cached(task)
        if cached is not None:
            record(task, cached, 0.0, True)
        else:
            pending.append(task)
    if jobs == 1:
        for task in pending:
            began = time.perf_counter()
            record(task, runner.run(task), time.perf_counter() - began, False)
    else:
        paths = {k: str(v) for k, v in datasets.items()}
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_task_in_worker, budget, str(output), paths, threads, split, t) for t in pending]
            for future in as_completed(futures):
                task, produced, seconds = future.result()
                record(task, produced, seconds, False)
    return results, log


OBJECTIVE_ARMS = {
    "joint": {},
    "embedding_only": {"caption_loss_weight": 0.0},
    "caption_only": {"contrastive_loss_weight": 0.0},
}


def _objective_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Retrieval R@1 as the report takes it (mean of both directions) and caption CIDEr."""
    directions = [metrics.get(k) for k in ("image_to_text/R@1", "text_to_image/R@1")]
    retrieval = sum(directions) / 2 if None not in directions else None
    return {"retrieval/R@1": retrieval, "caption/cider": metrics.get("caption/cider")}


def run_objectives(args: argparse.Namespace, budget: Any, threads: int) -> int:
    """Claim 1 alone: the three stage-1 arms (joint as a plain stage-1 task: no continuations or long fine-tunes)."""
    seeds = tuple(args.seeds or budget.seeds)
    budget = dataclasses.replace(
        budget, steps=budget.steps * args.steps_scale, seeds=seeds, name=f"{budget.name}_objectives_x{args.steps_scale}"
    )
    output = Path(args.output_dir or PACKAGE_DIR / "runs" / budget.name).resolve()
    print(f"Claim 1 only: {budget.steps} stage-1 steps, seeds {list(seeds)}\nOutput: {output}", flush=True)
    began, cpu_began = time.perf_counter(), time.process_time() + children_cpu_seconds()
    datasets = prepare_datasets(budget, output / "data", progress=not args.no_progress)
    tasks = [Task("single", arm, seed, overrides) for seed in seeds for arm, overrides in OBJECTIVE_ARMS.items()]
    results, _ = run_tasks(
        budget, output, datasets, args.jobs, threads, args.fresh, not args.no_progress, args.split, tasks
    )
    table = {
        arm: {
            seed: {**_objective_metrics(r["metrics"]), "train_cpu_s": r["train"]["train_cpu_s"]}
            for seed, r in sorted(per_seed.items())
        }
        for arm, per_seed in results.items()
    }
    cpu_s = time.process_time() + children_cpu_seconds() - cpu_began
    summary = {
        "command": "python -m experiments.run " + " ".join(sys.argv[1:]),
        "budget": budget.as_dict(),
        "split": args.split,
        "results": table,
        "wall_s": time.perf_counter() - began,
        "cpu_s": cpu_s,
        "load_after": load_average(),
    }
    (output / "objectives.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(table, indent=1))
    print(f"Wrote {output / 'objectives.json'} ({summary['cpu_s']:.0f} CPU s, {summary['wall_s'] / 60:.1f} min)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    budget = BUDGETS[args.budget or ("quick" if args.quick else "full")]
    if args.only_objectives:
        return run_objectives(args, budget, args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
    output = Path(args.output_dir or PACKAGE_DIR / "runs" / budget.name).resolve()
    report_dir = Path(args.report_dir or (PACKAGE_DIR if budget.name == "full" else output)).resolve()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    command = "python -m experiments.run " + " ".join(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    context: dict[str, Any] = {
        "command": command.strip(),
        "budget": budget.as_dict(),
        "jobs": args.jobs,
        "threads": threads,
        "load_before": load_average(),
        "environment": environment(),
        "split": args.split,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(f"Experiments, {budget.name} budget: {budget.note}\nOutput: {output}\nReport: {report_dir}", flush=True)
    began, cpu_began = time.perf_counter(), time.process_time() + children_cpu_seconds()
    datasets = prepare_datasets(budget, output / "data", progress=not args.no_progress)
    results, log = run_tasks(budget, output, datasets, args.jobs, threads, args.fresh, not args.no_progress, args.split)
    spec = experiment_architecture(budget.preset, budget.vocab_size)
    texts = TaskRunner(budget, output, datasets, threads).training_texts()
    context["visibility"] = {
        variant: long_caption_visibility(datasets[variant], texts, budget.vocab_size, CLIP_CONTEXT - 2, args.split)
        for variant in LONG_VARIANTS
    }
    context.update(
        results=results,
        task_log=log,
        wall_s=time.perf_counter() - began,
        load_after=load_average(),
        cpu_s=time.process_time() + children_cpu_seconds() - cpu_began,
        spec=spec,
        arms=[a.__dict__ for a in arms_for(spec)],
        preambles=dict(LONG_VARIANTS),
    )
    if any(not entry["cached"] for entry in log) or not log:
        _write_run_info(output / "run_info.json", context)
    else:
        _reuse_run_info(output / "run_info.json", context)
    report = write_report(report_dir, context)
    print(f"Wrote {report} ({(time.perf_counter() - began) / 60:.1f} min)")
    return 0


RUN_KEYS = (
    "command",
    "jobs",
    "threads",
    "load_before",
    "load_after",
    "environment",
    "started",
    "wall_s",
    "cpu_s",
    "task_log",
    "budget",
    "split",
)


def _write_run_info(path: Path, context: dict[str, Any]) -> None:
    """Record how the results were computed, for a later report regenerated from them."""
    path.write_text(json.dumps({k: context[k] for k in RUN_KEYS}, indent=1, default=str) + "\n")


def _reuse_run_info(path: Path, context: dict[str, Any]) -> None:
    """Every result came from an earlier run: report that run's command, time and machine, and say so."""
    if not path.is_file():
        return
    info = json.loads(path.read_text())
    if info.get("budget") != context["budget"] or info.get("split") != context["split"]:
        return
    context["regenerated"] = {k: context[k] for k in ("command", "started")}
    context.update({k: info[k] for k in RUN_KEYS})


if __name__ == "__main__":
    raise SystemExit(main())
