"""Make an MM-GEM from a CLIP/SigLIP vision tower and a causal LM (or export a trained checkpoint) and publish it.

    mmgem-convert --vision-model openai/clip-vit-large-patch14 \\
        --language-model TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T --output-dir mmgem-vitl-tinyllama
    mmgem-convert --from-checkpoint runs/stage2/checkpoint-5000 --output-dir my-mmgem --push-to-hub me/my-mmgem

(or `python -m mmgem.conversion.convert_mmgem ...`). The output folder is one complete Hub repo, written to a temporary
sibling and renamed into place only after the model was reloaded in a fresh process: a failure leaves no output.

Python API: [`convert`], [`export_checkpoint`], [`push_folder`].
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mmgem.cli import HelpFormatter, in_cli_terms
from mmgem.conversion.checkpoints import (
    checkpoint_kind,
    load_merged_adapter,
    load_model_folder,
    load_state_dict_file,
    parse_key_mapping,
)
from mmgem.conversion.components import Composition, compose, parse_dtype
from mmgem.conversion.publish import (
    CardInfo,
    HubPushError,
    check_output_dir,
    check_push_access,
    check_repo_id,
    first_card_metadata,
    hub_id_of,
    infer_license,
    publish,
    push_folder,
)
from mmgem.errors import debug_requested, one_line

logger = logging.getLogger("mmgem.conversion")

DEFAULT_MAX_SHARD_SIZE = "5GB"


def _check_max_shard_size(max_shard_size: int | str) -> None:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = max_shard_size if isinstance(max_shard_size, int) else parse_size_to_int(max_shard_size)
        if isinstance(size, bool) or size <= 0:
            raise ValueError
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(
            "`max_shard_size` must be a positive size such as '5GB' or '500MB', or an int (bytes); "
            f"got {max_shard_size!r}."
        ) from error


@dataclass(frozen=True)
class ExportOptions:
    """How [`convert`] and [`export_checkpoint`] write and publish the folder: their shared keyword arguments.

    Args:
        dtype: "float32", "float16" or "bfloat16"; None/"auto" keeps the source's dtype (components of different
            dtypes are upcast to float32).
        max_shard_size: largest safetensors shard ("5GB"); bigger models get an index.
        overwrite: replace `output_dir` (only when it holds a model).
        license: model card license; default: the components' (or the checkpoint card's) license, else "other".
        base_models: model card `base_model` ids; default: the components' Hub ids.
        push_to_hub: also upload the folder to this repo (created if needed) in one commit.
        private: create the repo private.
        token: Hub token; default: HF_TOKEN or the login cache.
        verify: reload the folder in a fresh process before declaring success (default; keep it on).
    """

    dtype: str | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    license: str | None = None
    base_models: list[str] | None = None
    push_to_hub: str | None = None
    private: bool = False
    token: str | None = field(default=None, repr=False)
    verify: bool = True

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[ExportOptions, dict[str, Any]]:
        """The export options in `kwargs`, and the remaining (MM-GEM config) arguments."""
        names = {f.name for f in fields(cls)}
        options = cls(**{k: v for k, v in kwargs.items() if k in names})
        return options, {k: v for k, v in kwargs.items() if k not in names}


@dataclass
class _Export:
    """What every export checks before any work: the output folder, the dtype and the Hub access."""

    output_dir: Path
    torch_dtype: Any
    push_token: str | None


def _start_export(output_dir: str | Path, options: ExportOptions, sources: list[str | None]) -> _Export:
    """Check the shared options before any work (a bad one raises a ValueError naming it)."""
    output_dir = Path(output_dir)
    torch_dtype = parse_dtype(options.dtype)
    _check_max_shard_size(options.max_shard_size)
    check_output_dir(output_dir, options.overwrite, sources)
    push_token = check_push_access(options.push_to_hub, options.token) if options.push_to_hub is not None else None
    return _Export(output_dir, torch_dtype, push_token)


def _finish_export(
    export: _Export, holder: Composition, card_info: CardInfo, options: ExportOptions, **publish_kwargs: Any
) -> Path:
    """Write (and reload-check) the folder, then push it if asked."""
    publish(
        holder,
        export.output_dir,
        card_info,
        max_shard_size=options.max_shard_size,
        overwrite=options.overwrite,
        verify=options.verify,
        **publish_kwargs,
    )
    if options.push_to_hub:
        push_folder(export.output_dir, options.push_to_hub, private=options.private, token=export.push_token)
    return export.output_dir


def _base_models(explicit: list[str] | None, *sources: str | None) -> list[str]:
    if explicit:
        return list(explicit)
    return [hub_id for hub_id in (hub_id_of(s) for s in sources) if hub_id]


def convert(
    vision_model: str,
    language_model: str,
    output_dir: str | Path,
    *,
    pool_grid_size: int = 4,
    projection_dim: int = 768,
    projection_type: str = "mlp",
    region_sampling_ratio: int | None = None,
    **kwargs: Any,
) -> Path:
    """Compose an MM-GEM from a vision tower and a causal LM and write it as a complete Hub folder.

    Args:
        vision_model: Hub id or local folder of a full CLIP / SigLIP model or of its vision tower alone.
        language_model: Hub id or local folder of a causal LM (Llama family, Qwen2, ...) with its tokenizer.
        output_dir: the folder to write (replaced only with `overwrite`, and only when it holds a model).
        pool_grid_size, projection_dim, projection_type, region_sampling_ratio: MM-GEM options (see MMGEMConfig).
        kwargs: the [`ExportOptions`] (`dtype`, `max_shard_size`, `overwrite`, `license`, `base_models`,
            `push_to_hub`, `private`, `token`, `verify`), and any other MMGEMConfig argument.

    Returns:
        `output_dir`.
    """
    options, mmgem_kwargs = ExportOptions.split(kwargs)
    export = _start_export(output_dir, options, [vision_model, language_model])
    composition = compose(
        vision_model,
        language_model,
        dtype=export.torch_dtype,
        pool_grid_size=pool_grid_size,
        projection_dim=projection_dim,
        projection_type=projection_type,
        region_sampling_ratio=region_sampling_ratio,
        **mmgem_kwargs,
    )
    notes = list(composition.notes)
    card_info = CardInfo(
        vision_model=vision_model,
        language_model=language_model,
        base_models=_base_models(options.base_models, vision_model, language_model),
        license=options.license or infer_license([vision_model, language_model], notes),
        dropped_keys=composition.dropped_keys,
        notes=notes,
        repo_id=options.push_to_hub,
    )
    return _finish_export(export, composition, card_info, options, source_reference=composition.reference)


def export_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    base_model: str | None = None,
    vision_model: str | None = None,
    language_model: str | None = None,
    key_mapping: dict[str, str] | str | None = None,
    **kwargs: Any,
) -> Path:
    """Export a trained MM-GEM checkpoint as a complete Hub folder (same output as [`convert`]).

    Args:
        checkpoint: a local (a) folder saved by `MMGEMModel.save_pretrained` (a training output or a Trainer
            `checkpoint-XXX`), (b) PEFT adapter folder on an MM-GEM base (merged with `merge_and_unload`), or (c) state
            dict file (.safetensors, .bin, .pt, .pth; also wrapped as {"state_dict"|"model": ...}).
        base_model: (b) the MM-GEM the adapter was trained on (default: the adapter's `base_model_name_or_path`);
            (c) the MM-GEM whose architecture and processor the state dict fits; (a) where to find the processor when
            the checkpoint has none (it is looked for in the checkpoint and its parent folder first).
        vision_model, language_model: (c) instead of `base_model`: the components the state dict was trained from
            (the architecture is composed as [`convert`] does, the other `kwargs` giving the MM-GEM options).
        key_mapping: (c) {regex: replacement} for the state dict's keys (applied in order with `re.sub`), as a
            dict, a JSON string or a JSON file.
        kwargs: the [`ExportOptions`], as for [`convert`]; with (c) also MM-GEM config options.
    """
    options, mmgem_kwargs = ExportOptions.split(kwargs)
    checkpoint = Path(checkpoint)
    kind = checkpoint_kind(checkpoint)
    mapping = parse_key_mapping(key_mapping)
    if kind != "state_dict" and (mapping is not None or vision_model or language_model):
        raise ValueError(
            "`key_mapping`, `vision_model` and `language_model` apply to a state dict file only (`from_checkpoint` is "
            "a saved model or adapter folder, which knows its architecture); use `base_models` to name the components "
            "in the model card."
        )
    export = _start_export(output_dir, options, [str(checkpoint), base_model, vision_model, language_model])
    if kind == "model":
        model, processor = load_model_folder(checkpoint, base_model, export.torch_dtype)
    elif kind == "adapter":
        model, processor = load_merged_adapter(checkpoint, base_model, export.torch_dtype)
    else:
        model, processor = load_state_dict_file(
            checkpoint, mapping, export.torch_dtype, base_model, vision_model, language_model, **mmgem_kwargs
        )
    notes: list[str] = []
    inherited = first_card_metadata([str(checkpoint), str(checkpoint.parent), base_model])
    card_info = CardInfo(
        vision_model=vision_model,
        language_model=language_model,
        base_models=options.base_models
        or _base_models(None, base_model, vision_model, language_model)
        or list(getattr(inherited, "base_model", None) or []),
        license=options.license
        or getattr(inherited, "license", None)
        or infer_license([vision_model, language_model], notes),
        checkpoint=checkpoint.name,
        checkpoint_kind={"model": "saved model", "adapter": "LoRA adapter, merged", "state_dict": "state dict"}[kind],
        notes=notes,
        repo_id=options.push_to_hub,
    )
    holder = Composition(model, processor)
    del model  # the holder owns it: `publish` releases it before the reload check
    return _finish_export(export, holder, card_info, options)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser(prog: str = "mmgem-convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=HelpFormatter,
        description="Make an MM-GEM from a CLIP/SigLIP vision tower and a causal LM, or export a trained checkpoint, "
        "as one complete Hugging Face Hub folder; optionally push it.",
    )
    sources = parser.add_argument_group("sources")
    sources.add_argument("--vision-model", help="Hub id or folder: a full CLIP/SigLIP model or its vision tower.")
    sources.add_argument("--language-model", help="Hub id or folder of a causal LM with its tokenizer.")
    sources.add_argument(
        "--from-checkpoint",
        help="Export a trained checkpoint instead: a saved MM-GEM / Trainer checkpoint folder, a PEFT adapter folder "
        "(merged), or a state dict file (.safetensors/.bin/.pt).",
    )
    sources.add_argument(
        "--base-model", help="With --from-checkpoint: the MM-GEM (folder or Hub id) an adapter or state dict fits."
    )
    sources.add_argument(
        "--key-mapping", help="With a state dict: JSON (or a JSON file) of regex -> replacement for its keys."
    )
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", required=True, help="Folder to write (one complete Hub repo).")
    output.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    output.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="Weights dtype (default auto: keep the components' own dtype).",
    )
    output.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        type=lambda value: int(value) if value.isdigit() else value,
        help="Largest safetensors shard: '5GB', '500MB' or bytes (default 5GB).",
    )
    output.add_argument("--license", help="Model card license (default: the components' common license, or other).")
    output.add_argument(
        "--base-model-ids", nargs="+", help="Model card base_model ids (default: the components' Hub ids)."
    )
    output.add_argument(
        "--skip-reload-check",
        action="store_true",
        help="Do not reload the result in a fresh process before declaring success (not recommended).",
    )
    mmgem = parser.add_argument_group("MM-GEM options (fresh compositions and state dicts built from components)")
    mmgem.add_argument("--pool-grid-size", type=int, default=4, help="PoolAggregator grid side k (k*k visual tokens).")
    mmgem.add_argument("--projection-dim", type=int, default=768, help="Size of the shared embedding space.")
    mmgem.add_argument("--projection-type", default="mlp", choices=["mlp", "linear"], help="h1/h2/h3 type.")
    mmgem.add_argument("--region-sampling-ratio", type=int, help="RoIAlign samples per cell and axis.")
    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the folder to this repo in one commit.")
    hub.add_argument("--private", action="store_true", help="Create the repo private.")
    hub.add_argument(
        "--push-only", action="store_true", help="Push an existing --output-dir (e.g. after a refused push)."
    )
    return parser


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    common = dict(
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        license=args.license,
        base_models=args.base_model_ids,
        push_to_hub=args.push_to_hub,
        private=args.private,
        verify=not args.skip_reload_check,
    )
    options = dict(
        pool_grid_size=args.pool_grid_size,
        projection_dim=args.projection_dim,
        projection_type=args.projection_type,
        region_sampling_ratio=args.region_sampling_ratio,
    )
    if args.push_only:
        if not args.push_to_hub:
            parser.error("--push-only needs --push-to-hub REPO_ID.")
        push_folder(args.output_dir, args.push_to_hub, private=args.private)
    elif args.from_checkpoint:
        extra = options if (args.vision_model and args.language_model) else {}
        export_checkpoint(
            args.from_checkpoint,
            args.output_dir,
            base_model=args.base_model,
            vision_model=args.vision_model,
            language_model=args.language_model,
            key_mapping=args.key_mapping,
            **common,
            **extra,
        )
    else:
        if not (args.vision_model and args.language_model):
            parser.error("give --vision-model and --language-model, or --from-checkpoint.")
        if args.base_model or args.key_mapping:
            parser.error("--base-model and --key-mapping go with --from-checkpoint.")
        convert(args.vision_model, args.language_model, args.output_dir, **common, **options)


class _StderrHandler(logging.Handler):
    """Writes to the current `sys.stderr` (a StreamHandler would keep the stream it was created with)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _show_progress_messages() -> None:
    """The conversion's own step messages on stderr (not the HTTP client's request log)."""
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[mmgem-convert] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (`kill`, a job scheduler's stop) into SystemExit, so the staging folder and the reload-check
    process are cleaned up as for Ctrl-C. (SIGKILL cannot be caught: the next conversion removes its leftovers.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None, prog: str = "mmgem-convert") -> int:
    """Console entry point; returns the exit status (0 success, 1 failure, 2 bad arguments).

    Every `ValueError` is a bad argument here (the conversion checks its inputs before it writes anything); with
    `MMGEM_DEBUG=1` (or `mmgem --debug convert`) errors keep their traceback.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _show_progress_messages()
    try:
        with _sigterm_as_exit():
            _run(args, parser)
    except ValueError as error:
        if debug_requested():
            raise
        print(f"{prog}: error: {_in_flag_terms(one_line(error), parser, argv)}", file=sys.stderr)
        return 2
    except (HubPushError, RuntimeError, AssertionError, FileExistsError) as error:
        if debug_requested():
            raise
        print(f"{prog}: failed: {one_line(error)}", file=sys.stderr)
        return 1
    if args.push_to_hub:
        print(f"Done: {args.output_dir} pushed to {args.push_to_hub}")
    else:
        print(f"Done: {args.output_dir}")
    return 0


def _in_flag_terms(message: str, parser: argparse.ArgumentParser, argv: list[str] | None) -> str:
    """The message in the words of the command line (`from_checkpoint` -> `--from-checkpoint`)."""
    flags = [next((o for o in a.option_strings if o.startswith("--")), "") for a in parser._actions]
    message = in_cli_terms(message, [f for f in flags if f], list(sys.argv[1:] if argv is None else argv))
    for flag in flags:  # "pass overwrite (--overwrite)" -> "pass --overwrite"
        message = message.replace(f"{flag[2:].replace('-', '_')} ({flag})", flag)
    return message


def mmgem_main(argv: list[str] | None = None) -> int:
    """`mmgem convert ...`: the same command under the `mmgem` entry point."""
    return main(argv, prog="mmgem convert")


__all__ = ["ExportOptions", "HubPushError", "check_repo_id", "convert", "export_checkpoint", "main", "push_folder"]

if __name__ == "__main__":
    sys.exit(main())
