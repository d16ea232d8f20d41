"""Load a trained MM-GEM for export: a training output folder, a PEFT LoRA adapter to merge, or a bare state dict.

Every path ends in an in-memory `MMGEMModel` plus its processor, checked like a transformers load (no missing and
no unexpected keys), that `convert_mmgem.export_checkpoint` then writes as a complete Hub folder.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from modeling_mmgem.configuration_mmgem import MMGEMConfig
from modeling_mmgem.modeling_mmgem import MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor, add_mmgem_special_tokens

from .components import (
    load_image_processor,
    load_tokenizer,
    make_processor,
    quiet_transformers,
    resolve_language,
    resolve_vision,
)

logger = logging.getLogger("mmgem.conversion")

# The installed MMGEMConfig answers for model_type "mmgem": loading a saved folder's tokenizer (AutoTokenizer reads its
# config.json) then needs no remote code, instead of prompting for `trust_remote_code` (or failing unattended).
AutoConfig.register("mmgem", MMGEMConfig, exist_ok=True)

STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Containers that training scripts wrap a state dict in (`torch.save({"model": sd, "optimizer": ...})`).
STATE_DICT_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------- kinds
def checkpoint_kind(path: Path) -> str:
    """ "model" (a saved MM-GEM / Trainer checkpoint folder), "adapter" (PEFT) or "state_dict" (a weights file)."""
    if path.is_file():
        if path.suffix in STATE_DICT_SUFFIXES:
            return "state_dict"
        raise ValueError(
            f"`from_checkpoint` {str(path)!r} is a file but not a state dict ({', '.join(STATE_DICT_SUFFIXES)})."
        )
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "adapter"
        config_file = path / "config.json"
        if config_file.is_file():
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
            if model_type == "mmgem":
                return "model"
            raise ValueError(
                f"`from_checkpoint` {str(path)!r} holds a {model_type!r} model, not an MM-GEM (model_type 'mmgem')."
            )
    raise ValueError(
        f"`from_checkpoint` {str(path)!r} must be a saved MM-GEM folder (e.g. a Trainer checkpoint-XXX), a PEFT "
        f"adapter folder (adapter_config.json) or a state dict file ({', '.join(STATE_DICT_SUFFIXES)})."
    )


def parse_key_mapping(key_mapping: dict[str, str] | str | None) -> dict[str, str] | None:
    """A {regex: replacement} dict from a dict, a JSON string or the path of a JSON file; the regexes must compile."""
    if key_mapping is None:
        return None
    if isinstance(key_mapping, str):
        text = Path(key_mapping).read_text(encoding="utf-8") if Path(key_mapping).is_file() else key_mapping
        try:
            key_mapping = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"`key_mapping` must be a JSON object (or a JSON file) of regex -> replacement: {error}"
            ) from error
    if not isinstance(key_mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in key_mapping.items()
    ):
        raise ValueError(f"`key_mapping` must map regex strings to replacement strings; got {key_mapping!r}.")
    for pattern in key_mapping:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"`key_mapping` has an invalid regex {pattern!r}: {error}") from error
    return key_mapping


def _check_load_info(info: dict[str, Any], what: str, hint: str = "") -> None:
    problems = {
        k: sorted(str(x) for x in info.get(k, ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if any(problems.values()):
        details = "; ".join(f"{k} ({len(v)}): {v[:8]}" for k, v in problems.items() if v)
        raise ValueError(f"{what} does not load cleanly into MMGEMModel: {details}.{hint}")


def load_mmgem(path: str, dtype: torch.dtype | None, argument: str) -> MMGEMModel:
    """A saved MM-GEM (folder or Hub id) through the installed class; every key must match."""
    try:
        with quiet_transformers():
            model, info = MMGEMModel.from_pretrained(path, dtype=dtype or "auto", output_loading_info=True)
    except (RepositoryNotFoundError, HFValidationError) as error:
        raise ValueError(f"`{argument}` {path!r} is neither a local folder nor a Hub repo you can read.") from error
    except OSError as error:
        raise ValueError(f"`{argument}` {path!r} is not a loadable MM-GEM: {error}") from error
    _check_load_info(info, f"`{argument}` {path!r}")
    return model.eval()


def find_processor(candidates: list[tuple[str, str]]) -> MMGEMProcessor:
    """The first MMGEMProcessor found among (argument, path) candidates (local folders need the processor files)."""
    tried = []
    for argument, path in candidates:
        if path is None:
            continue
        local = Path(path)
        if local.is_dir() and not any((local / name).is_file() for name in PROCESSOR_FILES):
            tried.append(path)
            continue
        try:
            return MMGEMProcessor.from_pretrained(path)
        except (OSError, ValueError, RepositoryNotFoundError, HFValidationError) as error:
            logger.debug("No processor in %s (%s): %s", argument, path, error)
            tried.append(path)
    raise ValueError(
        f"No MM-GEM processor (tokenizer + image processor) found in {tried}; pass `base_model` (--base-model), an "
        "exported MM-GEM folder or repo that has one."
    )


# ---------------------------------------------------------------------------------------------- (a) saved model
def load_model_folder(path: Path, base_model: str | None, dtype: torch.dtype | None) -> tuple[MMGEMModel, Any]:
    """A folder saved by `MMGEMModel.save_pretrained` (a training output or a Trainer checkpoint-XXX)."""
    logger.info("Loading the trained MM-GEM from %s", path)
    model = load_mmgem(str(path), dtype, "from_checkpoint")
    # Trainer checkpoints hold the processor only if it was given to the Trainer; the run's top folder often has it.
    processor = find_processor(
        [("from_checkpoint", str(path)), ("from_checkpoint", str(path.parent)), ("base_model", base_model)]
    )
    return model, processor


# ---------------------------------------------------------------------------------------------- (b) LoRA adapter
def load_merged_adapter(path: Path, base_model: str | None, dtype: torch.dtype | None) -> tuple[MMGEMModel, Any]:
    """Apply a PEFT adapter to its MM-GEM base and merge it (`merge_and_unload`); the merge is checked against the
    unmerged adapter on random inputs."""
    from peft import PeftConfig, PeftModel

    peft_config = PeftConfig.from_pretrained(str(path))
    base = base_model or peft_config.base_model_name_or_path
    if not base:
        raise ValueError(
            f"`base_model` is needed: the adapter {str(path)!r} names no base model in adapter_config.json."
        )
    logger.info("Loading the base MM-GEM %s and the adapter %s", base, path)
    model = load_mmgem(base, dtype, "base_model")
    peft_config.inference_mode = True
    peft_model = PeftModel(model, peft_config, adapter_name="default")
    result = peft_model.load_adapter(str(path), adapter_name="default")
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"`from_checkpoint` adapter {str(path)!r} does not fit the base {base!r}: missing adapter keys "
            f"{sorted(result.missing_keys)[:8]}, unexpected keys {sorted(result.unexpected_keys)[:8]}."
        )
    processor = find_processor([("from_checkpoint", str(path)), ("base_model", base)])
    probe = _probe_inputs(model.config, processor)
    before = _embeddings(peft_model, probe)
    logger.info("Merging the adapter into the base weights")
    merged = peft_model.merge_and_unload()
    after = _embeddings(merged, probe)
    tolerance = 1e-4 if next(merged.parameters()).dtype == torch.float32 else 2e-2
    for name in before:
        if not torch.allclose(before[name], after[name], atol=tolerance, rtol=tolerance):
            raise AssertionError(
                f"Merging the adapter changed the {name} (max diff {(before[name] - after[name]).abs().max()})."
            )
    return merged.eval(), processor


def _probe_inputs(config: MMGEMConfig, processor: Any) -> dict[str, torch.Tensor]:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    image = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    inputs = processor(images=[Image.fromarray(image)])
    text = processor(text=["a photo of a red square on the left"])
    return {
        "pixel_values": inputs["pixel_values"],
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
    }


@torch.no_grad()
def _embeddings(model: Any, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dtype = next(model.parameters()).dtype
    image = model.get_image_features(probe["pixel_values"].to(dtype)).pooler_output.float()
    text = model.get_text_features(probe["input_ids"], probe["attention_mask"]).pooler_output.float()
    return {"image embeddings": image, "text embeddings": text}


# ---------------------------------------------------------------------------------------------- (c) state dict
def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        container = next((k for k in STATE_DICT_CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if container is None:
            raise ValueError(
                f"`from_checkpoint` {str(path)!r} is not a state dict: a dict with non-tensor values and none of the "
                f"keys {STATE_DICT_CONTAINER_KEYS}."
            )
        obj = obj[container]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"`from_checkpoint` {str(path)!r} holds no tensors.")
    return obj


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): clone all but the first of each storage."""
    seen, out = set(), {}
    for key, tensor in state.items():
        storage = (tensor.untyped_storage().data_ptr(), tensor.device.type)
        out[key] = tensor.clone() if storage in seen else tensor.contiguous()
        seen.add(storage)
    return out


def rename_keys(state: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Apply every `key_mapping` regex, in order, to every key (`re.sub`); two keys may not end up the same."""
    if not key_mapping:
        return state
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new_key = key
        for pattern, replacement in key_mapping.items():
            new_key = re.sub(pattern, replacement, new_key)
        if new_key in renamed:
            raise ValueError(f"`key_mapping` renames two keys of the state dict to {new_key!r}.")
        renamed[new_key] = tensor
    return renamed


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle errors come in many types
        raise ValueError(
            f"`from_checkpoint` {str(path)!r} cannot be read as a weights-only torch file: {error}"
        ) from error
    return _unwrap_state_dict(obj, path)


def _write_weights(path: Path, folder: Path, key_mapping: dict[str, str] | None) -> None:
    """Put the (renamed) state dict in `folder` as model.safetensors; a plain safetensors file is only linked.

    The renaming is done here rather than through `from_pretrained(key_mapping=...)`: transformers remembers a load-time
    mapping and reverts it when saving, which would write the checkpoint's own names back out.
    """
    target = folder / "model.safetensors"
    if path.suffix == ".safetensors" and not key_mapping:
        target.symlink_to(path.resolve())
        return
    state = rename_keys(_read_state_dict(path), key_mapping)
    save_file(_unshared(state), target, metadata={"format": "pt"})


def skeleton_from_components(vision_model: str, language_model: str, **mmgem_kwargs: Any) -> tuple[Any, Any, Any]:
    """(config, generation config, processor) of a fresh composition, from configs and tokenizers only (meta)."""
    vision = resolve_vision(vision_model)
    text_config = resolve_language(language_model)
    tokenizer = load_tokenizer(language_model)
    image_processor = load_image_processor(vision)
    config = MMGEMConfig(vision_config=vision.tower_config, text_config=copy.deepcopy(text_config), **mmgem_kwargs)
    with torch.device("meta"), quiet_transformers():
        shell = MMGEMModel(config)
    add_mmgem_special_tokens(tokenizer, shell)  # sets the vocabulary size and token ids the state dict must match
    return shell.config, shell.generation_config, make_processor(shell.config, image_processor, tokenizer)


def load_state_dict_file(
    path: Path,
    key_mapping: dict[str, str] | None,
    dtype: torch.dtype | None,
    base_model: str | None = None,
    vision_model: str | None = None,
    language_model: str | None = None,
    **mmgem_kwargs: Any,
) -> tuple[MMGEMModel, Any]:
    """A state dict (keys optionally renamed by `key_mapping`: each regex -> replacement applied in order with `re.sub`)
    loaded into the architecture of `base_model` or of the `vision_model` + `language_model` composition."""
    if base_model is not None:
        config = MMGEMConfig.from_pretrained(base_model)
        generation_config = None
        processor = find_processor([("base_model", base_model)])
    elif vision_model is not None and language_model is not None:
        config, generation_config, processor = skeleton_from_components(vision_model, language_model, **mmgem_kwargs)
    else:
        raise ValueError(
            "A state dict has no architecture: give `base_model` (--base-model, an MM-GEM folder or repo) or both "
            "`vision_model` and `language_model` (--vision-model, --language-model)."
        )
    with tempfile.TemporaryDirectory(prefix="mmgem-state-dict-") as folder:
        config.save_pretrained(folder)
        if generation_config is not None:
            generation_config.save_pretrained(folder)
        _write_weights(path, Path(folder), key_mapping)
        logger.info("Loading the state dict %s", path)
        with quiet_transformers():
            model, info = MMGEMModel.from_pretrained(folder, dtype=dtype or "auto", output_loading_info=True)
    hint = ' Rename the keys with `key_mapping` (--key-mapping \'{"regex": "replacement"}\').'
    _check_load_info(info, f"`from_checkpoint` {str(path)!r}", hint)
    return model.eval(), processor
