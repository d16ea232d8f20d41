"""Checkpoint loading: time and peak memory, each side in a fresh Python process.

Peak RSS of a load is defined as `VmHWM - RSS0`, read from `/proc/self/status` of the loading process:

- `RSS0` is the resident set after the imports (torch, transformers and the modeling modules of the LM and the
  vision tower, which transformers would otherwise import lazily inside `from_pretrained`: about 125 MB that have
  nothing to do with the weights), after `gc.collect()`, and on CUDA after the CUDA context exists; it is what the
  interpreter costs before any weight is touched. Importing MM-GEM's own remote code stays inside the measurement.
- `VmHWM` is the resident-set high-water mark after the load and the read below. Just before the load it is reset
  to the current RSS by writing `5` to `/proc/self/clear_refs` (Linux >= 4.0), so import-time peaks do not count.
  Where the reset is refused, `ru_maxrss` is used (the peak since the process started) and the record says so.
- Right after `from_pretrained` every parameter and buffer is read once (summed): transformers may hand back tensors
  backed by the memory-mapped safetensors file, whose pages become resident only when first used, so without the
  read a lazy load would look free. The time reported covers `from_pretrained` plus that read.

The ratio reported is that peak over the size of the `*.safetensors` files: 1.0 means the load never held more
than one copy of the weights in memory (resident pages of the memory-mapped file count, as the kernel counts them).
Run as `python -m benchmarks.loading --side ours|baseline ...` by the suite; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _status_kib(key: str) -> int | None:
    """A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`), or None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _import_model_classes(text_type: str, vision_type: str) -> None:
    """Import the stock LM and vision classes both sides build, so the import is not counted as loading."""
    import transformers
    from transformers.models.auto import modeling_auto

    getattr(transformers, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_type])
    getattr(transformers, modeling_auto.MODEL_MAPPING_NAMES[vision_type])


def _read_every_weight(models: list) -> None:
    """Touch every parameter and buffer once, so lazily mapped weights become resident (see module docstring)."""
    import torch

    with torch.no_grad():
        for model in models:
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.sum()


def _worker(args: argparse.Namespace) -> dict:
    """Load one side once and measure it (runs in the child process)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    _import_model_classes(args.text_type, args.vision_type)
    dtype = getattr(torch, args.dtype)
    device_kwargs = {} if args.device == "cpu" else {"device_map": args.device}
    if args.device.startswith("cuda"):
        torch.zeros(1, device=args.device)  # create the CUDA context before RSS0: it is not part of the load
    gc.collect()
    rss0 = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    start = now()
    if args.side == "ours":
        models = [AutoModel.from_pretrained(args.path, trust_remote_code=True, dtype=dtype, **device_kwargs)]
    else:
        models = [
            AutoModelForCausalLM.from_pretrained(Path(args.path) / "language_model", dtype=dtype, **device_kwargs),
            AutoModel.from_pretrained(Path(args.path) / "vision_model", dtype=dtype, **device_kwargs),
        ]
    _read_every_weight(models)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = now() - start
    peak = _status_kib("VmHWM")
    if not reset:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    classes = " + ".join(type(m).__name__ for m in models)
    return {
        "seconds": seconds,
        "peak_rss_bytes": None if peak is None or rss0 is None else (peak - rss0) * 1024,
        "rss0_bytes": None if rss0 is None else rss0 * 1024,
        "peak_method": "VmHWM after clear_refs reset" if reset else "ru_maxrss (no reset)",
        "classes": classes,
    }


def save_baseline_checkpoints(model, folder: Path) -> Path:
    """Save the LM and the vision tower of `model` as stock transformers checkpoints (the baseline's files)."""
    model.language_model.save_pretrained(folder / "language_model")
    model.vision_model.save_pretrained(folder / "vision_model")
    return folder


def safetensors_bytes(folder: Path) -> int:
    """Total size of the `*.safetensors` files directly in `folder`."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure_in_subprocess(
    side: str,
    path: Path,
    model_types: tuple[str, str],
    device: str,
    dtype: str,
    threads: int,
    modules_cache: Path,
    clock: str = "wall",
) -> dict:
    """Run one load in a fresh interpreter and return its measurements."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(modules_cache),  # remote code is copied here, not into the user's cache
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS=str(threads),
    )
    command = [
        sys.executable,
        "-m",
        "benchmarks.loading",
        "--side",
        side,
        "--path",
        str(path),
        "--device",
        device,
        "--dtype",
        dtype,
        "--threads",
        str(threads),
        "--clock",
        clock,
        "--text-type",
        model_types[0],
        "--vision-type",
        model_types[1],
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"loading benchmark ({side}) failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure one checkpoint load (internal to the benchmark suite).")
    parser.add_argument("--side", choices=("ours", "baseline"), required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--text-type", default="llama", help="model_type of the language model")
    parser.add_argument("--vision-type", default="clip_vision_model", help="model_type of the vision tower")
    print(json.dumps(_worker(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
