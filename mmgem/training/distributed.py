"""Multi-process launches (`torchrun`, `accelerate launch`, `deepspeed`) made to train ONE distributed model.

A launcher starts N copies of `mmgem train` and tells each its place through `WORLD_SIZE` / `RANK` / `LOCAL_RANK`.
On a machine without an accelerator, transformers then still sets up a single-process Trainer unless `--use_cpu`
is given: every rank would read the whole dataset, train its own replica and write the same output folder. Here
the options are completed so that the ranks form one gloo process group (DeepSpeed keeps its own CPU accelerator),
and a launch that still does not end up distributed is refused before any work.
"""

from __future__ import annotations

import os
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
    """Under a launcher on a CPU-only machine, the options that make the ranks one DDP run: `use_cpu` (else the
    Trainer stays single-process) and the `gloo` backend. DeepSpeed (`--deepspeed`) is left to its own CPU
    accelerator, which needs `use_cpu` off. Called before `TrainingArguments.__post_init__` sets up the devices."""
    if launched_world_size() <= 1 or has_accelerator() or args.deepspeed:
        return
    args.use_cpu = True
    if args.ddp_backend is None:
        args.ddp_backend = "gloo"


def check_launch(args: Any) -> None:
    """Refuse a multi-process launch that did not become one distributed run (the ranks would train replicas)."""
    world_size = launched_world_size()
    if world_size > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(
            f"`mmgem train` was launched as {world_size} processes (WORLD_SIZE), but the Trainer is not distributed "
            f"(parallel_mode={args.parallel_mode.value}): each process would train its own copy. Check the launcher's "
            "options and `--ddp_backend` / `--use_cpu`."
        )
