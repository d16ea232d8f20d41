"""Train MM-GEM with the Hugging Face Trainer: stage 1 (image-caption pairs) and stage 2 (regions too).

Command line (every `transformers.TrainingArguments` option is accepted as well, e.g. `--learning_rate`,
`--gradient_accumulation_steps`, `--fsdp`, `--deepspeed`, `--save_steps`, `--bf16`)::

    mmgem train --model FOLDER --data train.jsonl --output-dir OUT [--stage 2] [--max-steps N] [--lora]
    mmgem train --from-scratch demo --data train.jsonl --output-dir OUT       # new model, tokenizer trained on data
    torchrun --nproc_per_node 2 -m mmgem.cli train ...               # DDP (gloo on CPU)

Python::

    from mmgem.training.train import train
    result = train(model="stage1", data="train.jsonl", output_dir="stage2", stage=2, max_steps=500)

`OUT` ends up a model folder (weights, config, processor, remote code, sentence-transformers files) that
`mmgem evaluate`, `AutoModel.from_pretrained(OUT, trust_remote_code=True)` and the conversion script load, next to
the Trainer's `checkpoint-*` folders (resume with `--resume_from_checkpoint latest`) and `training_log.json` (the
logged losses: `loss`, `loss_contrastive`, `loss_caption`, `logit_scale`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate.data_loader import IterableDatasetShard
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed

from mmgem.build import build_mmgem, train_tokenizer
from mmgem.cli import HelpFormatter
from mmgem.data.collator import STAGES, MMGEMCollator, MMGEMCollatorCallback
from mmgem.data.records import ImageCaptionDataset, load_records
from mmgem.data.sampling import HardNegativeSampler, check_group_size, record_groups
from mmgem.data.sources import DataSourceArguments, check_data_arguments, streaming_training_data, uses_streaming
from mmgem.errors import checking_user_input
from mmgem.integrations.lora import apply_lora
from mmgem.integrations.sentence_transformers import write_sentence_transformers_files
from mmgem.loading import load_model
from mmgem.presets import PRESETS, architecture
from mmgem.training.freezing import freeze
from modeling_mmgem.modeling_mmgem import MMGEMConfig, MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor

ON_ERROR_CHOICES = ("fail", "skip")
LORA_VISION_CHOICES = ("no", "lora", "full")
FINAL_TMP_NAME = ".mmgem-final.tmp"
# Options that hold credentials: never pickled into training_args.bin (see MMGEMTrainingArguments.__getstate__).
SECRET_ARGUMENTS = ("hub_token",)

# From-scratch architectures (`--from-scratch NAME`): the project's one preset registry.
MODEL_PRESETS = PRESETS


@dataclass
class MMGEMTrainingArguments(DataSourceArguments, TrainingArguments):
    """`transformers.TrainingArguments` plus MM-GEM's own options (defaults changed where noted).

    Exactly one of `model` (a saved MM-GEM folder or Hub id) and `from_scratch` (a preset name from
    `MODEL_PRESETS` or a JSON file with `vision_config`, `text_config`, MM-GEM config options and `vocab_size`) is
    required, as are `data` and `output_dir`.
    """

    model: str | None = field(default=None, metadata={"help": "MM-GEM model folder or Hub id to start from."})
    from_scratch: str | None = field(
        default=None,
        metadata={
            "help": f"Build a new model instead of --model: a preset {sorted(MODEL_PRESETS)} or a JSON file with "
            "vision_config, text_config, MM-GEM options and vocab_size; the tokenizer is trained on the data."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow Python code shipped in the --model folder or repo to run (MM-GEM needs none)."},
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a .jsonl file, an imagefolder, or sources in the published layouts (webdataset "
            "shards, datasets, LLaVA, COCO, Karpathy, Visual Genome, RefCOCO, GRIT), several joined with '::'."
        },
    )
    stage: int = field(default=1, metadata={"help": "1: image-caption pairs; 2: adds region boxes and captions."})
    data_on_error: str = field(
        default="fail", metadata={"help": "Bad records (missing image, box outside image, ...): 'fail' or 'skip'."}
    )
    allow_outside_data_root: bool = field(
        default=False,
        metadata={"help": "Accept image paths outside the --data file's folder (absolute or ../ paths)."},
    )
    use_long_caption: bool = field(default=False, metadata={"help": "Train on each record's long_caption."})
    max_regions_per_image: int | None = field(
        default=None, metadata={"help": "Stage 2: regions sampled per image and step (default all)."}
    )
    unique_region_texts: bool = field(
        default=True,
        metadata={"help": "Stage 2: leave out regions whose caption already occurs in the batch (false negatives)."},
    )
    hard_negative_field: str | None = field(
        default=None,
        metadata={
            "help": "Fill batches with blocks of --hard_negative_group_size records that share this record field "
            "(e.g. colour_group of the synthetic data): in-batch negatives that are hard to tell apart."
        },
    )
    hard_negative_group_size: int = field(
        default=4, metadata={"help": "With --hard_negative_field: records of one group per block (>= 2)."}
    )
    vision_learning_rate_multiplier: float = field(
        default=1.0,
        metadata={"help": "The vision tower's learning rate as a multiple of --learning_rate (schedule alike)."},
    )
    freeze_vision: bool = field(default=False, metadata={"help": "Freeze the vision tower."})
    freeze_language_model: bool = field(default=False, metadata={"help": "Freeze the language model."})
    freeze_projections: bool = field(default=False, metadata={"help": "Freeze h1/h2/h3 and the temperature."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model (PEFT)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_vision: str = field(default="no", metadata={"help": "Vision tower under LoRA: 'no', 'lora' or 'full'."})
    merge_lora: bool = field(
        default=True, metadata={"help": "Save the merged model in OUT (the adapter goes to OUT/lora_adapter)."}
    )
    torch_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (CPU training)."})
    # Defaults changed from TrainingArguments: MM-GEM batches hold PIL images and region lists that the Trainer
    # must not drop, losses are worth seeing early, and a cosine schedule with warm-up suits the contrastive loss.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False for MM-GEM."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X steps."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a float < 1: share of all steps)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Images per device and step."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Experiment trackers."})

    def __post_init__(self) -> None:
        # TrainingArguments quietly replaces a missing output_dir by "trainer_output"; MM-GEM requires one (the
        # usage marks it required and check_arguments refuses a run without it).
        self.output_dir_missing = self.output_dir is None
        super().__post_init__()

    def __getstate__(self) -> dict[str, Any]:
        """What pickling (the Trainer's `training_args.bin` in OUT and every checkpoint) stores: the options without
        any secret. `--hub_token` stays usable in this process but is never written to a file."""
        state = dict(self.__dict__)
        for name in SECRET_ARGUMENTS:
            if state.get(name) is not None:
                state[name] = None
        return state


@dataclass
class TrainResult:
    """What :func:`train` returns: the final model folder, the trained model and processor, and the Trainer's log."""

    output_dir: Path
    model: Any
    processor: Any
    log_history: list[dict[str, Any]]
    metrics: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------- checks
def check_arguments(args: MMGEMTrainingArguments) -> None:
    """Raise a ValueError naming the argument for every inconsistent option, before any work starts."""
    if not args.output_dir or getattr(args, "output_dir_missing", False):
        raise ValueError("`output_dir` is required: the folder the trained model is written to.")
    if (args.model is None) == (args.from_scratch is None):
        raise ValueError("Give exactly one of `model` (a saved MM-GEM) and `from_scratch` (a preset or JSON file).")
    if args.from_scratch is not None and args.from_scratch not in MODEL_PRESETS:
        if not Path(args.from_scratch).is_file():
            raise ValueError(
                f"`from_scratch` must be one of {sorted(MODEL_PRESETS)} or a JSON file; got {args.from_scratch!r}."
            )
    if args.data is None:
        raise ValueError("`data` is required: a .jsonl file or an imagefolder with metadata.jsonl.")

    check_data_arguments(args)
    if args.stage not in STAGES:
        raise ValueError(f"`stage` must be 1 or 2; got {args.stage!r}.")
    if args.data_on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"`data_on_error` must be one of {ON_ERROR_CHOICES}; got {args.data_on_error!r}.")
    if args.lora_vision not in LORA_VISION_CHOICES:
        raise ValueError(f"`lora_vision` must be one of {LORA_VISION_CHOICES}; got {args.lora_vision!r}.")
    if args.lora and (args.freeze_language_model or args.freeze_vision or args.freeze_projections):
        raise ValueError(
            "`freeze_*` options apply to full fine-tuning; with `lora` the base model is frozen and `lora_vision` "
            "chooses how the vision tower trains."
        )
    if args.freeze_vision and args.freeze_language_model and args.freeze_projections:
        raise ValueError(
            "`freeze_vision`, `freeze_language_model` and `freeze_projections` together freeze everything."
        )
    if args.remove_unused_columns:
        raise ValueError("`remove_unused_columns` must be False: MM-GEM batches are built from raw records.")
    if not args.vision_learning_rate_multiplier > 0:
        raise ValueError(
            f"`vision_learning_rate_multiplier` must be > 0; got {args.vision_learning_rate_multiplier!r}."
        )
    if args.max_regions_per_image is not None and args.max_regions_per_image < 1:
        raise ValueError(
            "`max_regions_per_image` must be a positive int (or left out: all regions); "
            f"got {args.max_regions_per_image!r}."
        )
    if args.hard_negative_field is not None:
        check_group_size(args.per_device_train_batch_size, args.hard_negative_group_size)
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ValueError(f"`torch_threads` must be a positive int; got {args.torch_threads!r}.")


# ---------------------------------------------------------------------------------------------------------- data
def training_texts(records: Sequence[Any], use_long_caption: bool = False) -> list[str]:
    """Every text a model will read or write: captions (or long captions) and region captions."""
    texts = [(r.long_caption if use_long_caption else None) or r.caption for r in records]
    return texts + [region.caption for r in records for region in r.regions]


def hard_negative_sampler(args: MMGEMTrainingArguments, records: Sequence[Any], streaming: bool) -> Any:
    """The `HardNegativeSampler` that `hard_negative_field` asks for (None when it is not set)."""
    if args.hard_negative_field is None:
        return None
    if streaming:
        raise ValueError(
            "`hard_negative_field` needs the whole dataset in memory to group it; streaming sources (webdataset, "
            "--streaming) are read in order."
        )
    groups = record_groups(records, args.hard_negative_field)
    seed = args.data_seed if args.data_seed is not None else args.seed
    return HardNegativeSampler(groups, args.per_device_train_batch_size, args.hard_negative_group_size, seed=seed)


# ---------------------------------------------------------------------------------------------------------- model
def scratch_spec(from_scratch: str) -> dict[str, Any]:
    """The architecture of a preset name or a JSON file (a deep copy, safe to modify)."""
    if from_scratch in MODEL_PRESETS:
        return architecture(from_scratch)
    spec = json.loads(Path(from_scratch).read_text(encoding="utf-8"))
    if not isinstance(spec, dict) or "vision_config" not in spec or "text_config" not in spec:
        raise ValueError(
            f"`from_scratch` file {from_scratch} must hold a JSON object with vision_config and text_config."
        )
    return spec


def build_from_scratch(spec: dict[str, Any], texts: Sequence[str]) -> tuple[Any, Any]:
    """A new MM-GEM and processor: a byte-level BPE tokenizer trained on `texts`, random weights."""
    spec = dict(spec)
    vocab_size = spec.pop("vocab_size", 512)
    vision_config, text_config = spec.pop("vision_config"), spec.pop("text_config")
    context = text_config.get("max_position_embeddings", 512)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, model_max_length=context)
    return build_mmgem(vision_config, text_config, tokenizer, **spec)


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


def prepare_model(args: MMGEMTrainingArguments, records: Sequence[Any], checkpoint: str | None) -> tuple[Any, Any]:
    """The model to train (frozen parts and LoRA applied) and its processor."""
    if args.model is not None:
        model, processor = load_model(args.model, args.trust_remote_code)
    elif checkpoint is not None and (Path(checkpoint) / "config.json").is_file() and not args.lora:
        # Resuming a from-scratch run: the checkpoint holds the tokenizer and architecture (weights are loaded by
        # the Trainer), so a re-trained tokenizer can never disagree with the saved embeddings.

        model = MMGEMModel(MMGEMConfig.from_pretrained(checkpoint))
        processor = MMGEMProcessor.from_pretrained(checkpoint)
    else:
        model, processor = build_from_scratch(
            scratch_spec(args.from_scratch), training_texts(records, args.use_long_caption)
        )
    if args.lora:
        vision = {"no": False, "lora": "lora", "full": "full"}[args.lora_vision]
        model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, train_vision=vision)
    else:
        freeze(model, args.freeze_vision, args.freeze_language_model, args.freeze_projections)
    return model, processor


# ---------------------------------------------------------------------------------------------------------- trainer
class MMGEMTrainer(Trainer):
    """The HF Trainer, also logging the two loss terms (`loss_contrastive`, `loss_caption`) and the temperature.

    The joint loss is what is optimised; the terms are averaged over the steps since the last log and over the
    processes, like the Trainer's own `loss`.
    """

    def __init__(self, *args: Any, train_sampler: torch.utils.data.Sampler | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_sampler = train_sampler  # e.g. a HardNegativeSampler; None: the Trainer's own
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_counts: dict[str, int] = {}

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        outputs = model(**inputs)
        if model.training:
            for name in ("loss_contrastive", "loss_caption"):
                value = outputs.get(name)
                if value is not None:
                    total = self._term_sums.get(name, torch.zeros((), device=value.device))
                    self._term_sums[name] = total + value.detach().float()
                    self._term_counts[name] = self._term_counts.get(name, 0) + 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        if self.train_sampler is not None and (train_dataset is None or train_dataset is self.train_dataset):
            return self.train_sampler
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self) -> Any:
        # A streaming dataset reads its own part per rank (`mmgem.data.sources`); accelerate's IterableDatasetShard
        # would split it again, so it is made a pass-through (as transformers does for rank-aware samplers).
        loader = super().get_train_dataloader()
        shard = getattr(loader, "dataset", None)
        if isinstance(shard, IterableDatasetShard) and getattr(shard.dataset, "splits_by_rank", False):
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the vision tower's parameters in groups of their own learning rate
        (`vision_learning_rate_multiplier` times the others'; the schedule scales every group alike)."""
        multiplier = getattr(self.args, "vision_learning_rate_multiplier", 1.0)
        if self.optimizer is not None or multiplier == 1.0:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        vision = {id(p) for name, p in (model or self.model).named_parameters() if ".vision_model." in f".{name}"}
        groups = []
        for group in optimizer.param_groups:
            for is_vision in (False, True):
                params = [p for p in group["params"] if (id(p) in vision) == is_vision]
                if params:
                    lr = group["lr"] * (multiplier if is_vision else 1.0)
                    groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params, "lr": lr})
        optimizer.param_groups.clear()  # nothing has been stepped yet: regroup the same parameters in place
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name in sorted(self._term_sums):
                mean = self._term_sums[name] / self._term_counts[name]
                logs[name] = self.accelerator.reduce(mean, reduction="mean").item()
            self._term_sums.clear()
            self._term_counts.clear()
            scale = self._logit_scale()
            if scale is not None:
                logs["logit_scale"] = scale
        super().log(logs, start_time)

    def _logit_scale(self) -> float | None:
        model = self.accelerator.unwrap_model(self.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        module = getattr(model, "logit_scale", None)
        module = getattr(module, "original_module", module)  # PEFT's modules_to_save wrapper
        log_value = getattr(module, "log_value", None)
        if log_value is None or log_value.numel() != 1:  # sharded (FSDP): skip
            return None
        return float(module().detach())


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


def save_final_model(trainer: MMGEMTrainer, args: MMGEMTrainingArguments, processor: Any) -> Any:
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


# ---------------------------------------------------------------------------------------------------------- entry
def make_arguments(args: MMGEMTrainingArguments | None = None, **kwargs: Any) -> MMGEMTrainingArguments:
    """`MMGEMTrainingArguments` from keyword arguments (or a copy of `args` with them applied)."""
    if args is not None:
        values = {f.name: getattr(args, f.name) for f in fields(args) if f.init}
        if getattr(args, "output_dir_missing", False):
            values["output_dir"] = None  # still missing unless given now
        values.update(kwargs)
        kwargs = values
    known = {f.name for f in fields(MMGEMTrainingArguments) if f.init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"Unknown training options {unknown}; see MMGEMTrainingArguments / TrainingArguments.")
    return MMGEMTrainingArguments(**kwargs)


def train(
    args: MMGEMTrainingArguments | None = None, *, callbacks: Sequence[TrainerCallback] = (), **kwargs: Any
) -> TrainResult:
    """Train MM-GEM (one stage) and write the final model folder to `output_dir`.

    Args:
        args: the options; or give them as keyword arguments (any `MMGEMTrainingArguments` /
            `TrainingArguments` field), e.g. `train(model="m", data="d.jsonl", output_dir="o", max_steps=100)`.
        callbacks: more `transformers.TrainerCallback`s for the Trainer (e.g. evaluation during training).

    Returns:
        A :class:`TrainResult` with the output folder, the trained (merged, with LoRA) model and processor, the
        Trainer's log history and the training metrics.
    """
    with checking_user_input():  # the options and the data are checked before any work starts
        args = make_arguments(args, **kwargs) if kwargs or args is None else args
        check_arguments(args)
        checkpoint = resolve_checkpoint(args)
        if uses_streaming(args):
            # `records` are then the texts of the first samples (for a tokenizer trained on the data).
            dataset, records = streaming_training_data(args)
        else:
            records = load_records(args.data, args.data_on_error, args.allow_outside_data_root)
            dataset = None
        if not records:
            raise ValueError(f"`data` {args.data} holds no usable record.")
        if args.stage == 2 and not any(r.regions for r in records):
            raise ValueError(f"`stage=2` trains on regions, but no record of `data` {args.data} has any.")
        sampler = hard_negative_sampler(args, records, streaming=dataset is not None)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    # Seed before building: a model built from scratch (and LoRA's init) is then reproducible, as the Trainer's data.
    set_seed(args.seed)
    model, processor = prepare_model(args, records, checkpoint)
    if dataset is None:
        dataset = ImageCaptionDataset(records, use_long_caption=args.use_long_caption, with_regions=args.stage == 2)
    collator = MMGEMCollator(
        processor, args.stage, args.max_regions_per_image, seed=args.seed, unique_region_texts=args.unique_region_texts
    )
    trainer = MMGEMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[MMGEMCollatorCallback(collator), *callbacks],
        train_sampler=sampler,
    )
    output = trainer.train(resume_from_checkpoint=checkpoint)
    model = save_final_model(trainer, args, processor)
    return TrainResult(
        output_dir=Path(args.output_dir),
        model=model,
        processor=processor,
        log_history=list(trainer.state.log_history),
        metrics=dict(output.metrics),
    )


# The options `mmgem train --help` shows, by group; every other TrainingArguments option is accepted too and listed
# by `mmgem train --help-trainer`.
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "model": (
        "model", "from_scratch", "trust_remote_code", "freeze_vision", "freeze_language_model", "freeze_projections",
    ),
    "data": (
        "data", "data_on_error", "allow_outside_data_root", "use_long_caption",
        *(f.name for f in fields(DataSourceArguments)),
    ),
    "stages and losses": (
        "stage", "max_regions_per_image", "unique_region_texts", "hard_negative_field", "hard_negative_group_size",
    ),
    "LoRA": ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_vision", "merge_lora"),
    "training (the Trainer's options that matter most; MM-GEM changes some defaults)": (
        "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
        "learning_rate", "lr_scheduler_type", "warmup_steps", "save_steps", "logging_steps", "logging_first_step",
        "seed", "bf16", "resume_from_checkpoint", "report_to", "remove_unused_columns", "torch_threads",
    ),
}  # fmt: skip
HELP_TRAINER_FLAG = "--help-trainer"
ARGS_FILE_FLAG = "--args_file"


def build_parser(show_trainer_options: bool = False) -> HfArgumentParser:
    """The parser of `mmgem train`: MM-GEM's options grouped first; the Trainer's other options are accepted but
    listed only with `show_trainer_options` (`mmgem train --help-trainer`)."""
    parser = HfArgumentParser(
        MMGEMTrainingArguments,
        prog="mmgem train",
        usage="mmgem train (--model FOLDER | --from-scratch PRESET) --data DATA --output-dir OUT [options]",
        description="Train MM-GEM (stage 1 or 2, full or LoRA) with the Hugging Face Trainer.",
        epilog="Every transformers.TrainingArguments option is accepted as well (--fsdp, --deepspeed, "
        f"--save_total_limit, --eval_strategy, ...): `mmgem train {HELP_TRAINER_FLAG}` lists them all.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(HELP_TRAINER_FLAG, action="store_true", help="show every TrainingArguments option and exit")
    parser.add_argument(
        ARGS_FILE_FLAG, metavar="FILE", action="append",
        help="read options from a file of command-line flags (repeatable; flags given after it win)",
    )  # fmt: skip
    group_of = {name: title for title, names in OPTION_GROUPS.items() for name in names}
    groups = {title: parser.add_argument_group(title) for title in OPTION_GROUPS}
    trainer_group = parser.add_argument_group("all other TrainingArguments options") if show_trainer_options else None
    for action in list(parser._optionals._group_actions):
        if action.dest in ("help", "help_trainer", "args_file"):
            continue
        target = groups.get(group_of.get(action.dest)) or trainer_group
        if target is None:
            action.help = argparse.SUPPRESS  # accepted, listed by --help-trainer
            continue
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's `--no_X` for a True default
            action.help = f"turn off --{action.dest.replace('_', '-')}"
        parser._optionals._group_actions.remove(action)  # argparse has no public way to regroup an option
        target._group_actions.append(action)
    for title, group in groups.items():
        group._group_actions.sort(key=lambda action: OPTION_GROUPS[title].index(action.dest))
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> MMGEMTrainingArguments:
    """Command-line options (`--option value`, dashes or underscores) -> `MMGEMTrainingArguments`."""
    # The first output is the dataclass; a namespace with `--help-trainer` (not a field) follows it.
    argv = expand_args_files(list(sys.argv[1:] if argv is None else argv))
    return build_parser().parse_args_into_dataclasses(args=argv)[0]


def expand_args_files(argv: list[str]) -> list[str]:
    """`--args_file FILE` (repeatable): the flags written in FILE (whitespace-separated, e.g. the recipes'), placed
    before the command line's other options, which therefore win."""
    pre = argparse.ArgumentParser(add_help=False)  # `-h` stays with the real parser
    pre.add_argument("--args_file", "--args-file", action="append", default=[])
    known, rest = pre.parse_known_args(argv)
    file_args: list[str] = []
    for path in known.args_file:
        if not Path(path).is_file():
            raise ValueError(f"`--args_file` {path} does not exist.")
        file_args += Path(path).read_text(encoding="utf-8").split()
    return file_args + rest


def main(argv: Sequence[str] | None = None) -> int:
    """`mmgem train ...`: parse the options, train, print where the model is."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if HELP_TRAINER_FLAG in argv:
        build_parser(show_trainer_options=True).print_help()
        return 0
    with checking_user_input():
        args = parse_arguments(argv)  # TrainingArguments checks its own options in __post_init__
    result = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(saved_message(args, Path(result.output_dir)))
    return 0


def saved_message(args: MMGEMTrainingArguments, output_dir: Path) -> str:
    """Where the result is: the merged model, or with `--lora --no-merge-lora` only the adapter."""
    if args.lora and not args.merge_lora:
        adapter = output_dir / "lora_adapter"
        return (
            f"Saved the LoRA adapter to {adapter} (not merged: --no-merge-lora); load it with "
            f"peft.AutoPeftModel.from_pretrained({str(adapter)!r}, trust_remote_code=True) or merge it with "
            f"`mmgem convert --from-checkpoint {adapter} --output-dir MERGED`"
        )
    adapter = " (the LoRA adapter in lora_adapter/)" if args.lora else ""
    return f"Saved the trained MM-GEM to {output_dir}{adapter}"
