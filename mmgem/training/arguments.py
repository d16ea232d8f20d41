"""The options of `mmgem train`: `MMGEMTrainingArguments` (TrainingArguments plus MM-GEM's own), their checks, and
the command-line parser (MM-GEM's options grouped in `--help`, every TrainingArguments option accepted)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from mmgem.cli import HelpFormatter
from mmgem.data.collator import STAGES
from mmgem.data.sampling import check_group_size
from mmgem.data.sources import DataSourceArguments, check_data_arguments
from mmgem.presets import PRESETS
from mmgem.training.averaging import check_ema_decay
from mmgem.training.distributed import check_launch, complete_launch_options
from mmgem.training.precision import check_attention, check_autocast_dtype

ON_ERROR_CHOICES = ("fail", "skip")
LORA_VISION_CHOICES = ("no", "lora", "full")
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
    image_cache_mb: float = field(
        default=0.0,
        metadata={
            "help": "Keep up to this many MB of decoded training images in memory (3 bytes a pixel, per process and "
            "DataLoader worker), so that later epochs do not decode them again (not for streamed data). 0: none."
        },
    )
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
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernels in training, both towers: 'eager', 'sdpa', ... (default: the model's)."},
    )
    tower_autocast_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Run the two towers (vision tower, language model's decoder layers) under torch.autocast in this "
            "dtype ('bfloat16' or 'float16'), heads and losses in fp32; on a CPU with bf16 instructions 'bfloat16' "
            "with --attn_implementation eager trains small models fastest."
        },
    )
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Keep an exponential moving average of the trained weights with this decay (e.g. 0.99: about "
            "the last 100 steps), saved in every checkpoint; it becomes the final model (default: off)."
        },
    )
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
        # Before the Trainer's own set-up picks the devices: under torchrun / accelerate launch on CPU the ranks
        # must form one process group (see mmgem.training.distributed).
        complete_launch_options(self)
        super().__post_init__()
        check_launch(self)

    def __getstate__(self) -> dict[str, Any]:
        """What pickling (the Trainer's `training_args.bin` in OUT and every checkpoint) stores: the options without
        any secret. `--hub_token` stays usable in this process but is never written to a file."""
        state = dict(self.__dict__)
        for name in SECRET_ARGUMENTS:
            if state.get(name) is not None:
                state[name] = None
        return state


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
    if not args.image_cache_mb >= 0:  # also refuses NaN
        raise ValueError(f"`image_cache_mb` must be a number of megabytes >= 0; got {args.image_cache_mb!r}.")
    if args.torch_threads is not None and args.torch_threads < 1:
        raise ValueError(f"`torch_threads` must be a positive int; got {args.torch_threads!r}.")
    check_attention(args.attn_implementation)
    check_autocast_dtype(args.tower_autocast_dtype)
    check_ema_decay(args.ema_decay)
    if args.ema_decay is not None and (args.fsdp or args.deepspeed):
        raise ValueError(
            "`ema_decay` averages whole parameters in each process; with FSDP or DeepSpeed each process holds only "
            "shards of them. Leave out `ema_decay`, or train without `fsdp` / `deepspeed`."
        )


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


# The options `mmgem train --help` shows, by group; every other TrainingArguments option is accepted too and listed
# by `mmgem train --help-trainer`.
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "model": (
        "model",
        "from_scratch",
        "trust_remote_code",
        "freeze_vision",
        "freeze_language_model",
        "freeze_projections",
    ),
    "data": (
        "data",
        "data_on_error",
        "allow_outside_data_root",
        "use_long_caption",
        "image_cache_mb",
        *(f.name for f in fields(DataSourceArguments)),
    ),
    "stages and losses": (
        "stage",
        "max_regions_per_image",
        "unique_region_texts",
        "hard_negative_field",
        "hard_negative_group_size",
    ),
    "LoRA": ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_vision", "merge_lora"),
    "training (the Trainer's options that matter most; MM-GEM changes some defaults)": (
        "output_dir",
        "max_steps",
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "vision_learning_rate_multiplier",
        "lr_scheduler_type",
        "warmup_steps",
        "save_steps",
        "logging_steps",
        "logging_first_step",
        "seed",
        "bf16",
        "tower_autocast_dtype",
        "attn_implementation",
        "ema_decay",
        "resume_from_checkpoint",
        "report_to",
        "remove_unused_columns",
        "torch_threads",
    ),
}
GROUP_OF = {name: title for title, names in OPTION_GROUPS.items() for name in names}
TRAINER_OPTIONS = {f.name for f in fields(TrainingArguments) if f.init}
HELP_TRAINER_FLAG = "--help-trainer"
ARGS_FILE_FLAG = "--args_file"
TRAINER_GROUP = "all other TrainingArguments options"


class GroupedArgumentParser(HfArgumentParser):
    """HfArgumentParser that files each option under its `OPTION_GROUPS` title as the dataclass adds it; the
    Trainer's other options are accepted but hidden from `--help` unless `show_trainer_options`."""

    def __init__(self, *args: Any, show_trainer_options: bool = False, **kwargs: Any) -> None:
        self.show_trainer_options = show_trainer_options
        self.option_groups: dict[str, Any] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        dest = kwargs.get("dest") or names[0].lstrip("-").replace("-", "_")
        title = GROUP_OF.get(dest)
        if title is None and not (self.show_trainer_options and dest in TRAINER_OPTIONS):
            if dest in TRAINER_OPTIONS:
                kwargs["help"] = argparse.SUPPRESS  # accepted, listed by --help-trainer
            return super().add_argument(*names, **kwargs)
        if kwargs.get("action") == "store_false":  # HfArgumentParser's `--no_X` for a True default
            kwargs["help"] = f"turn off --{dest.replace('_', '-')}"
        if not self.option_groups:  # the groups in the order of OPTION_GROUPS, whichever option comes first
            titles = [*OPTION_GROUPS, *([TRAINER_GROUP] if self.show_trainer_options else [])]
            self.option_groups = {t: self.add_argument_group(t) for t in titles}
        return self.option_groups[title or TRAINER_GROUP].add_argument(*names, **kwargs)


def build_parser(show_trainer_options: bool = False) -> HfArgumentParser:
    """The parser of `mmgem train`: MM-GEM's options grouped first; the Trainer's other options are accepted but
    listed only with `show_trainer_options` (`mmgem train --help-trainer`)."""
    parser = GroupedArgumentParser(
        MMGEMTrainingArguments,
        show_trainer_options=show_trainer_options,
        prog="mmgem train",
        usage="mmgem train (--model FOLDER | --from-scratch PRESET) --data DATA --output-dir OUT [options]",
        description="Train MM-GEM (stage 1 or 2, full or LoRA) with the Hugging Face Trainer.",
        epilog="Every transformers.TrainingArguments option is accepted as well (--fsdp, --deepspeed, "
        f"--save_total_limit, --eval_strategy, ...): `mmgem train {HELP_TRAINER_FLAG}` lists them all.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(HELP_TRAINER_FLAG, action="store_true", help="show every TrainingArguments option and exit")
    parser.add_argument(
        ARGS_FILE_FLAG,
        metavar="FILE",
        action="append",
        help="read options from a file of command-line flags (repeatable; flags given after it win)",
    )
    return parser


def parse_arguments(argv: Sequence[str] | None = None) -> MMGEMTrainingArguments:
    """Command-line options (`--option value`, dashes or underscores) -> `MMGEMTrainingArguments`; `--args_file FILE`
    (repeatable) reads flags from a file first (HfArgumentParser's own args-file support: later flags win)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:  # before the args-file pre-parser, which would print its own help
        build_parser().parse_args(["--help"])
    check_args_files(argv)
    parsed = build_parser().parse_args_into_dataclasses(
        args=argv, look_for_args_file=False, args_file_flag=ARGS_FILE_FLAG
    )
    return parsed[0]  # a namespace with `--help-trainer` (not a field) follows the dataclass


def check_args_files(argv: Sequence[str]) -> None:
    """A named `--args_file` that does not exist is an error (HfArgumentParser would skip it silently)."""
    for flag, value in zip(argv, argv[1:]):
        if flag == ARGS_FILE_FLAG and not Path(value).is_file():
            raise ValueError(f"`--args_file` {value} does not exist.")
