"""MM-GEM benchmark suite: what MM-GEM costs against the stock pieces it is made of, and where it wins.

    python -m benchmarks.run --size small                 # CPU, float32 (make bench)
    python -m benchmarks.run --size tiny --quick          # under 2 minutes: smoke run
    python -m benchmarks.run --size paper --device cuda --dtype bfloat16   # see benchmarks/gpu.sh

Every comparison runs both sides in this process on the same weights, interleaved, after warm-up, and reports the
median of several repetitions and the ratio ours / baseline (lower is better). Checkpoint loading runs each side in a
fresh process. Writes `results.json` (list of records), `curves.json`, `table.md`, `machine.json` and the scaling
curves as PNGs into `--output` (default `benchmarks/results/<size>-<device>-<dtype>/`).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks import comparisons, curves, runtimes
from benchmarks.report import Record, markdown_table
from benchmarks.sizes import SIZES, build_bench_model
from benchmarks.timing import CLOCKS, TimingPlan
from mmgem.files import write_json_atomic, write_text_atomic

COMPARISONS: dict[str, Callable[[comparisons.SuiteContext], list[Record]]] = {
    "image_embedding": comparisons.image_embedding,
    "text_embedding": comparisons.text_embedding,
    "caption_decode": comparisons.caption_decode,
    "caption_first_token": comparisons.caption_first_token,
    "training_step": comparisons.training_step,
    "st_encode": comparisons.sentence_transformers_encode,
    "loading": comparisons.checkpoint_loading,
    "onnx_encode": runtimes.onnx_encode,
    "compiled_encode": runtimes.compiled_encode,
}
CURVES: dict[str, Callable[[comparisons.SuiteContext], dict[str, Any]]] = {
    "curve_visual_tokens": curves.visual_tokens_curve,
    "curve_text_length": curves.text_length_curve,
    "curve_batch": curves.batch_curve,
}
DTYPES = ("float32", "bfloat16", "float16")
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default small)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations dtype")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shorter curves")
    parser.add_argument("--output", type=Path, default=None, help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable cores)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (median)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall (default) or cpu: process CPU time, robust on a CPU shared with other jobs "
        "(use with --threads 1; CPU device only)",
    )
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join([*COMPARISONS, *CURVES])}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Clear errors before any model is built."""
    steps = [*COMPARISONS, *CURVES]
    if args.only is not None:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in steps]
        if unknown or not wanted:
            raise ValueError(f"`--only` must name steps among {steps}; got {args.only!r}.")
        args.steps = [s for s in steps if s in wanted]
    else:
        args.steps = steps
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"`--device` {args.device!r} is not a torch device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device {args.device}` asked for CUDA but torch sees no GPU.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"`--device` must be cpu or cuda[:i]; got {args.device!r}.")
    args.device = device
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.threads < 1:
        raise ValueError(f"`--threads` must be >= 1; got {args.threads}.")
    if args.clock == "cpu" and device.type != "cpu":
        raise ValueError("`--clock cpu` measures CPU time and is meaningless for GPU work; use --clock wall.")
    if args.reps is not None and args.reps < 1:
        raise ValueError(f"`--reps` must be >= 1; got {args.reps}.")
    if args.output is None:
        args.output = REPO_ROOT / "benchmarks" / "results" / f"{args.size}-{device.type}-{args.dtype}"


def timing_plan(args: argparse.Namespace) -> TimingPlan:
    plan = TimingPlan(reps=3, warmup=1, min_block_s=0.01) if args.quick else TimingPlan(reps=7, warmup=2)
    if args.reps is not None:
        plan.reps = args.reps
    plan.clock = args.clock
    return plan


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    """Where the numbers come from: CPU model and cores, threads, GPU, library versions."""
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": args.threads,
        "clock": args.clock,
        "device": str(args.device),
        "dtype": args.dtype,
        "size": args.size,
        "size_description": SIZES[args.size].describe(),
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        # Other jobs on the machine: a load above the core count means shared, noisier timings.
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if args.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def warn_if_busy(args: argparse.Namespace, info: dict[str, Any]) -> None:
    """Say so when other jobs compete for the CPU: wall-clock ratios then carry their noise."""
    load = info.get("load_average_at_start")
    cores = info.get("nproc") or 1
    if args.device.type == "cpu" and args.clock == "wall" and load and load[0] > cores:
        print(
            f"warning: this machine is busy (load average {load[0]:.1f} on {cores} cores); wall-clock timings will "
            "be noisy. `--clock cpu --threads 1` measures this process's CPU time instead.",
            file=sys.stderr,
        )


def run_suite(args: argparse.Namespace) -> tuple[list[Record], dict[str, Any]]:
    """Build the model, run the selected steps with a progress bar, write the outputs after every step."""
    import transformers

    transformers.logging.set_verbosity_error()  # generate()'s per-call notices would drown the progress bar
    transformers.logging.disable_progress_bar()  # one bar for the suite, not one per save/load
    torch.set_num_threads(args.threads)
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    info = machine_info(args)
    write_json_atomic(output / "machine.json", info)
    warn_if_busy(args, info)
    records: list[Record] = []
    curve_data: dict[str, Any] = {}
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="mmgem-bench-") as workdir:
        bar = tqdm(total=len(args.steps) + 1, desc="build model", unit="step")
        bm = build_bench_model(SIZES[args.size], args.device, dtype, seed=args.seed)
        bar.update(1)
        ctx = comparisons.SuiteContext(bm, timing_plan(args), Path(workdir), args.quick, args.threads)
        for step in args.steps:
            bar.set_description(step)
            torch.manual_seed(args.seed)
            if step in COMPARISONS:
                records.extend(COMPARISONS[step](ctx))
                write_json_atomic(output / "results.json", [r.to_dict() for r in records])
            else:
                curve = CURVES[step](ctx)
                curve_data[curve["name"]] = curve
                write_json_atomic(output / "curves.json", curve_data)
            bar.update(1)
        bar.close()
    write_json_atomic(output / "results.json", [r.to_dict() for r in records])
    clock = "wall clock" if args.clock == "wall" else "CPU time"
    title = f"MM-GEM {args.size} ({info.get('gpu', info['cpu'])}, {args.dtype}, {args.threads} threads, {clock})"
    pngs = curves.plot_curves(curve_data, output, title) if curve_data else []
    table = markdown_table(records)
    write_text_atomic(output / "table.md", table + "\n")
    print(f"\n{title}\n{SIZES[args.size].describe()}\n")
    print(table)
    if curve_data:
        print("\n" + curve_summary(curve_data))
    print(f"\nresults: {output / 'results.json'}")
    for png in pngs:
        print(f"curve:   {png}")
    return records, curve_data


def curve_summary(curve_data: dict[str, Any]) -> str:
    """A few sentences on the curves, for the terminal and the README."""
    lines = []
    c = curve_data.get("visual_tokens")
    if c:
        pts, ref = c["points"], c["llava"]
        lines.append(
            "visual tokens: first token "
            + ", ".join(f"{p['visual_tokens']} tok {p['first_token_s'] * 1e3:.1f} ms" for p in pts)
            + f"; LLaVA ({ref['visual_tokens']} tok) {ref['first_token_s'] * 1e3:.1f} ms. "
            + f"{c['new_tokens']}-token caption: "
            + ", ".join(f"{p['caption_s'] * 1e3:.0f} ms" for p in pts)
            + f" vs LLaVA {ref['caption_s'] * 1e3:.0f} ms."
        )
    c = curve_data.get("text_length")
    if c:
        lines.append(
            "text length: "
            + ", ".join(f"{p['tokens']} tok {p['seconds'] * 1e3:.1f} ms" for p in c["points"])
            + f" (CLIP's text tower stops at {c['clip_context']} tokens; this LM reads {c['context']})."
        )
    c = curve_data.get("batch")
    if c:
        lines.append(
            "throughput (items/s) by batch: "
            + "; ".join(
                f"b={p['batch']}: {p['image_per_s']:.1f} img, {p['text_per_s']:.1f} txt, {p['caption_per_s']:.2f} cap"
                for p in c["points"]
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_suite(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
