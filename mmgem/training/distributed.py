"""Multi-process launches (`torchrun`, `accelerate launch`, `deepspeed`) made to train ONE distributed model.

A launcher starts N copies of `mmgem train` and tells each its place through `WORLD_SIZE` / `RANK` / `LOCAL_RANK`.
On a machine without an accelerator, transformers then still sets up a single-process Trainer unless `--use_cpu`
is given: every rank would read the whole dataset, train its own replica and write the same output folder. Here
the options are completed so that the ranks form one gloo process group (DeepSpeed keeps its own CPU accelerator),
and a launch that still does not end up distributed is refused before any work.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from transformers.training_args import ParallelMode

# The variables torchrun, accelerate launch, deepspeed and MPI launchers set for every rank.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """How many processes the launcher started (1 when `mmgem train` was run directly)."""
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 1


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator) that the Trainer would use by default."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def complete_launch_options(args: Any) -> None:
    """Under a launcher on a CPU-only machine, the options that make the ranks one distributed run. Called before
    `TrainingArguments.__post_init__` sets up the devices.

    DDP: `use_cpu` (else the Trainer stays single-process) and the `gloo` backend. DeepSpeed (`--deepspeed`) runs
    on its CPU accelerator, which needs `use_cpu` off; there the Trainer would set up its process group without a
    backend, which accelerate counts as ONE process (the batch size and the data split would be wrong), so the gloo
    group is set up here and the Trainer told to use it (`accelerator_config.use_configured_state`).
    """
    if launched_world_size() <= 1 or has_accelerator():
        return
    if args.deepspeed:
        args.deepspeed = deepspeed_config_for_cpu(args.deepspeed)
        _deepspeed_process_group(args)
        return
    args.use_cpu = True
    if args.ddp_backend is None:
        args.ddp_backend = "gloo"


def deepspeed_config_for_cpu(config: str | dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config (a JSON path or dict) for DeepSpeed's CPU accelerator: its Adam/AdamW optimizer set to
    `torch_adam` (torch's implementation) instead of FusedAdam, a CUDA kernel that would be compiled on the spot and
    fails or stalls without a GPU. Everything else is kept as written (the recipes' GPU configs run unchanged)."""
    if isinstance(config, (str, os.PathLike)):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    config = json.loads(json.dumps(config))  # a deep copy
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        optimizer.setdefault("params", {}).setdefault("torch_adam", True)
    return config


def _deepspeed_process_group(args: Any) -> None:
    """DeepSpeed on CPU: a gloo process group through accelerate's `PartialState`, used by the Trainer."""
    from accelerate import PartialState

    backend = args.ddp_backend or "gloo"
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # how accelerate is told to let DeepSpeed start the group
    try:
        PartialState(backend=backend, timeout=timedelta(seconds=args.ddp_timeout))
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    config = args.accelerator_config
    if isinstance(config, str):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    elif hasattr(config, "to_dict"):  # an AcceleratorConfig given from Python
        config = config.to_dict()
    args.accelerator_config = {**(config or {}), "use_configured_state": True}


def check_launch(args: Any) -> None:
    """Refuse a multi-process launch that did not become one distributed run (the ranks would train replicas)."""
    world_size = launched_world_size()
    if world_size > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(
            f"`mmgem train` was launched as {world_size} processes (WORLD_SIZE), but the Trainer is not distributed "
            f"(parallel_mode={args.parallel_mode.value}): each process would train its own copy. Check the launcher's "
            "options and `--ddp_backend` / `--use_cpu`."
        )
