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

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from mmgem.build import build_mmgem, train_tokenizer
from mmgem.data.collator import MMGEMCollator, MMGEMCollatorCallback
from mmgem.data.records import ImageCaptionDataset, load_records
from mmgem.data.sampling import HardNegativeSampler, record_groups
from mmgem.data.sources import streaming_max_steps, streaming_training_data, uses_streaming
from mmgem.errors import checking_user_input
from mmgem.integrations.lora import apply_lora
from mmgem.loading import load_model
from mmgem.presets import architecture
from mmgem.training.arguments import (
    HELP_TRAINER_FLAG,
    MODEL_PRESETS,
    MMGEMTrainingArguments,
    build_parser,
    check_arguments,
    make_arguments,
    parse_arguments,
)
from mmgem.training.averaging import WeightAverage
from mmgem.training.checkpoints import resolve_checkpoint, save_final_model
from mmgem.training.freezing import freeze
from mmgem.training.precision import tower_autocast
from mmgem.training.trainer import MMGEMTrainer
from modeling_mmgem.modeling_mmgem import MMGEMConfig, MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor


@dataclass
class TrainResult:
    """What :func:`train` returns: the final model folder, the trained model and processor, and the Trainer's log."""

    output_dir: Path
    model: Any
    processor: Any
    log_history: list[dict[str, Any]]
    metrics: dict[str, Any]


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


def streaming_arguments(args: MMGEMTrainingArguments) -> MMGEMTrainingArguments:
    """A copy of `args` for a streaming source: its length in `max_steps`, and accelerate's batch dispatching off
    (each rank reads its own part of the stream). The caller's arguments are left as they were."""
    accelerator_config = {**args.accelerator_config.to_dict(), "dispatch_batches": False}
    return make_arguments(args, max_steps=streaming_max_steps(args), accelerator_config=accelerator_config)


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
    if args.attn_implementation is not None:
        model.set_attn_implementation(args.attn_implementation)
    if args.lora:
        vision = {"no": False, "lora": "lora", "full": "full"}[args.lora_vision]
        model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, train_vision=vision)
    else:
        freeze(model, args.freeze_vision, args.freeze_language_model, args.freeze_projections)
    return model, processor


# ---------------------------------------------------------------------------------------------------------- entry
def weight_average(args: MMGEMTrainingArguments, checkpoint: str | None) -> list[TrainerCallback]:
    """The `WeightAverage` callback that `ema_decay` asks for (none when it is not set)."""
    return [] if args.ema_decay is None else [WeightAverage(args.ema_decay, resume_from=checkpoint)]


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
            args = streaming_arguments(args)
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
        dataset = ImageCaptionDataset(
            records,
            use_long_caption=args.use_long_caption,
            with_regions=args.stage == 2,
            image_cache_bytes=int(args.image_cache_mb * 2**20),
        )
    collator = MMGEMCollator(
        processor, args.stage, args.max_regions_per_image, seed=args.seed, unique_region_texts=args.unique_region_texts
    )
    trainer = MMGEMTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        # The weight average goes before the caller's callbacks: at the end of training they see the final model.
        callbacks=[MMGEMCollatorCallback(collator), *weight_average(args, checkpoint), *callbacks],
        train_sampler=sampler,
    )
    with tower_autocast(model, args.tower_autocast_dtype):
        output = trainer.train(resume_from_checkpoint=checkpoint)
    model = save_final_model(trainer, args, processor)
    return TrainResult(
        output_dir=Path(args.output_dir),
        model=model,
        processor=processor,
        log_history=list(trainer.state.log_history),
        metrics=dict(output.metrics),
    )


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
