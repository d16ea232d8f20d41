"""Checkpoints of a training run: which `checkpoint-N` folder to resume from, and the final model folder, written
so that a loader never sees it half-written."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import Trainer

from mmgem.integrations.sentence_transformers import write_sentence_transformers_files
from mmgem.training.arguments import MMGEMTrainingArguments

FINAL_TMP_NAME = ".mmgem-final.tmp"
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def checkpoint_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed from (None: it is complete).

    The Trainer writes `trainer_state.json` last, so a checkpoint killed while being written lacks it, or holds a
    truncated one, or lacks its weights.
    """
    folder = Path(folder)
    if not any((folder / name).is_file() for name in CHECKPOINT_WEIGHTS):
        return "no weights"
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable trainer_state.json (it was being written when the run stopped)"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json has no global_step"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest `checkpoint-N` of `output_dir` that is complete; incomplete newer ones are skipped (and named)."""

    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = {
        int(match.group(1)): entry
        for entry in folder.iterdir()
        if entry.is_dir() and (match := re.fullmatch(r"checkpoint-(\d+)", entry.name))
    }
    for step in sorted(steps, reverse=True):
        problem = checkpoint_problem(steps[step])
        if problem is None:
            return str(steps[step])
        logging.getLogger(__name__).warning("Skipping incomplete checkpoint %s: %s", steps[step], problem)
    return None


def resolve_checkpoint(args: MMGEMTrainingArguments) -> str | None:
    """`resume_from_checkpoint` as a folder: "latest"/"last"/"true" picks the newest complete `checkpoint-*` of OUT."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("latest", "last", "true"):
        checkpoint = last_complete_checkpoint(args.output_dir)
        if checkpoint is None:
            raise ValueError(
                f"`resume_from_checkpoint={value}`: no checkpoint-* folder in {args.output_dir} is complete."
            )
        return checkpoint
    if not Path(value).is_dir():
        raise ValueError(f"`resume_from_checkpoint` folder does not exist: {value}.")
    problem = checkpoint_problem(value)
    if problem is not None:
        raise ValueError(f"`resume_from_checkpoint` {value} is incomplete: {problem}.")
    return str(value)


# ---------------------------------------------------------------------------------------------------------- saving
def _publish(staging: Path, output: Path) -> None:
    """Move the files of `staging` into `output`, `config.json` last (a loader never sees a half-written model)."""
    entries = sorted(staging.iterdir(), key=lambda p: p.name == "config.json")
    for entry in entries:
        target = output / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def save_final_model(trainer: Trainer, args: MMGEMTrainingArguments, processor: Any) -> Any:
    """Write the final model folder into OUT (all ranks call this; rank 0 writes). Returns the model to use."""
    output = Path(args.output_dir)
    staging = output / FINAL_TMP_NAME
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if args.lora:
        trainer.save_model(str(staging / "lora_adapter"))
        if args.merge_lora:
            model = model.merge_and_unload()
            if trainer.is_world_process_zero():
                model.save_pretrained(staging)
    else:
        trainer.save_model(str(staging))  # gathers FSDP / DeepSpeed shards
    if trainer.is_world_process_zero():
        processor.save_pretrained(staging)
        (staging / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        if not args.lora or args.merge_lora:
            write_sentence_transformers_files(staging)
        _publish(staging, output)
    trainer.accelerator.wait_for_everyone()
    return model
