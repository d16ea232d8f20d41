"""PEFT LoRA for MM-GEM: a `LoraConfig` that adapts the language model only, and helpers around it.

Recipe (see the README section "LoRA fine-tuning"):

    from mmgem.integrations.lora import apply_lora, load_lora_adapter

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    peft_model = apply_lora(model, r=16, alpha=32)             # LoRA on the LM, heads and new tokens trained
    Trainer(model=peft_model, args=TrainingArguments(..., remove_unused_columns=False), ...).train()
    peft_model.save_pretrained("adapter")                      # adapter + projections + logit scale + token rows
    peft_model = load_lora_adapter(folder, "adapter")          # zero missing / unexpected keys, or an error
    merged = peft_model.merge_and_unload()                     # a plain MMGEMModel again: save_pretrained / export

Also `AutoModel.from_pretrained("adapter", trust_remote_code=True)` (transformers loads the base named in
adapter_config.json, then the adapter) and `peft.AutoPeftModel.from_pretrained("adapter", trust_remote_code=True)`,
in any process, with or without mmgem: adapters from `apply_lora` record `transformers.AutoModel` as their base class
(see `record_auto_model_base`), not the module the class happened to be imported from.

What the config trains (everything else stays frozen):

- LoRA on the linear layers of the language model's decoder (`language_model.model...`): the target is a regex that
  fully matches module names under that decoder, because the CLIP / SigLIP vision attention uses the same names
  (`q_proj`, `k_proj`, `v_proj`) and a plain `target_modules=["q_proj", "v_proj"]` would adapt the vision tower too.
  `lm_head` is not adapted (the caption objective trains the decoder; the head's rows stay shared with the base).
- `modules_to_save`: h1 / h2 / h3 (`image_projection`, `visual_token_projection`, `text_projection`) and the
  temperature (`logit_scale`): small, newly initialised in a fresh MM-GEM, so trained in full and saved with the
  adapter.
- `trainable_token_indices`: the input-embedding rows of `[EMB]` and `[CAP]`, which are new tokens that a frozen
  embedding would leave random. `<image>` is not included: its embedding is always replaced by visual tokens.
- The vision tower is frozen by default; `train_vision="lora"` adds LoRA on its linear layers, `"full"` trains and
  saves it whole (`modules_to_save`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

import modeling_mmgem  # noqa: F401  (registers the installed classes: no remote code needed)
from mmgem.training.freezing import PROJECTION_MODULES
from modeling_mmgem.utils_mmgem import enable_activation_checkpointing

NEW_TOKEN_ID_NAMES = ("emb_token_id", "cap_token_id")
VISION_TRAINING_MODES = (False, "lora", "full")


# ---------------------------------------------------------------------------------------------- model inspection
def _unwrap(model: nn.Module) -> nn.Module:
    """The MMGEMModel inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _check_mmgem(model: Any) -> nn.Module:
    model = _unwrap(model)
    if not all(hasattr(model, name) for name in ("vision_model", "language_model", "get_text_features")):
        raise ValueError(f"`model` must be an MMGEMModel (or a PeftModel around one); got {type(model).__name__}.")
    return model


def _module_name(model: nn.Module, target: nn.Module) -> str:
    """Qualified name of `target` inside `model`."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}.")


def _linear_leaf_names(root: nn.Module) -> set[str]:
    """Last name components of the Linear (and GPT-2 style Conv1D) layers under `root`."""
    from transformers.pytorch_utils import Conv1D

    return {name.rsplit(".", 1)[-1] for name, module in root.named_modules() if isinstance(module, (nn.Linear, Conv1D))}


def _names_regex(prefix: str, leaf_names: Sequence[str]) -> str:
    """A regex that fully matches `prefix.<anything>.<one of leaf_names>` (PEFT uses `re.fullmatch` for strings)."""
    alternatives = "|".join(re.escape(name) for name in sorted(leaf_names))
    return rf"{re.escape(prefix)}\.(?:.*\.)?(?:{alternatives})"


def language_model_target_regex(model: nn.Module, target_modules: Sequence[str] | None = None) -> str:
    """The LoRA target regex for the language model's decoder layers (never the vision tower, never `lm_head`).

    Args:
        model: an MMGEMModel.
        target_modules: last name components to adapt (e.g. `["q_proj", "v_proj"]`); default: every linear layer of
            the decoder (for Llama / Qwen2: q, k, v, o, gate, up, down projections).
    """
    model = _check_mmgem(model)
    decoder = model.get_decoder()
    available = _linear_leaf_names(decoder)
    chosen = sorted(available) if target_modules is None else list(target_modules)
    if isinstance(target_modules, str) or not chosen:
        raise ValueError(f"`target_modules` must be a non-empty list of layer names from {sorted(available)}.")
    unknown = sorted(set(chosen) - available)
    if unknown:
        raise ValueError(
            f"`target_modules` {unknown} are not linear layers of the language model; choose from {sorted(available)}."
        )
    return _names_regex(_module_name(model, decoder), chosen)


def _vision_target_regex(model: nn.Module) -> str:
    available = _linear_leaf_names(model.vision_model)
    return _names_regex("vision_model", sorted(available))


def _check_unique_suffix(model: nn.Module, names: Sequence[str]) -> None:
    """PEFT matches `modules_to_save` with `str.endswith`: make sure each name hits exactly its top-level module."""
    keys = [key for key, _ in model.named_modules()]
    for name in names:
        hits = [key for key in keys if key.endswith(name)]
        if hits != [name]:
            raise ValueError(
                f"`modules_to_save` entry {name!r} must match exactly one top-level module; it matches {hits}."
            )


def new_token_ids(model: nn.Module) -> list[int]:
    """Ids of the MM-GEM tokens whose input-embedding rows must be trained: `[EMB]` and `[CAP]`."""
    model = _check_mmgem(model)
    ids = [getattr(model.config, name, None) for name in NEW_TOKEN_ID_NAMES]
    if any(token_id is None for token_id in ids):
        raise ValueError(
            "`model.config` lacks emb_token_id / cap_token_id: add the MM-GEM special tokens with "
            "`add_mmgem_special_tokens(tokenizer, model)` first."
        )
    return [int(token_id) for token_id in ids]


def expose_tied_weights(model: nn.Module) -> None:
    """Let PEFT see that `lm_head` is tied to the input embeddings when the language model ties them (e.g. SmolLM).

    PEFT looks for tied weights only through a dict `_tied_weights_keys` on the top-level model, then collects the
    children's entries; MMGEMModel inherits `None`, so PEFT would train the `[EMB]` / `[CAP]` rows for the input side
    only and `merge_and_unload` would then change those rows of the tied `lm_head` too (different logits). An empty
    dict (no ties of its own) makes PEFT tie the token adapter of `lm_head` to the embedding's. No-op when the class
    already defines it.
    """
    if getattr(model, "_tied_weights_keys", None) is None:
        model._tied_weights_keys = {}


# ---------------------------------------------------------------------------------------------- config
def mmgem_lora_config(
    model: nn.Module,
    r: int = 16,
    alpha: int | None = None,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
    train_vision: bool | str = False,
    train_projections: bool = True,
    train_new_tokens: bool = True,
    extra_modules_to_save: Sequence[str] = (),
    **lora_kwargs: Any,
) -> Any:
    """A `peft.LoraConfig` for MM-GEM: LoRA on the language model, projections / temperature / new tokens trained.

    Args:
        model: the MMGEMModel to adapt (names and token ids are read from it).
        r: LoRA rank.
        alpha: LoRA alpha (scaling `alpha / r`); default `2 * r`.
        dropout: dropout on the LoRA branch.
        target_modules: language-model layer names to adapt (default: all its linear layers; see
            [`language_model_target_regex`]).
        train_vision: False (default, vision tower frozen), "lora" (or True: LoRA on the vision tower's linear
            layers too), or "full" (the whole tower trained and saved with the adapter).
        train_projections: train and save h1 / h2 / h3 and `logit_scale` with the adapter (default True).
        train_new_tokens: train the `[EMB]` / `[CAP]` input-embedding rows (default True).
        extra_modules_to_save: more top-level modules to train fully and save with the adapter.
        **lora_kwargs: any other `LoraConfig` argument (e.g. `use_rslora`, `init_lora_weights`).

    Returns:
        a `LoraConfig` with no `task_type` (MM-GEM is neither a plain causal LM nor a feature extractor: the base
        `PeftModel` forwards every argument to `MMGEMModel.forward`).
    """
    from peft import LoraConfig

    model = _check_mmgem(model)
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"`r` must be a positive integer; got {r!r}.")
    if alpha is not None and (not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(f"`alpha` must be a positive number; got {alpha!r}.")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}.")
    train_vision = "lora" if train_vision is True else train_vision
    if train_vision not in VISION_TRAINING_MODES:
        raise ValueError(f"`train_vision` must be one of False, True, 'lora', 'full'; got {train_vision!r}.")
    conflicting = {"target_modules", "modules_to_save", "trainable_token_indices", "lora_alpha", "lora_dropout"}
    if conflicting & set(lora_kwargs):
        raise ValueError(f"pass {sorted(conflicting & set(lora_kwargs))} through this function's own arguments.")

    target = language_model_target_regex(model, target_modules)
    if train_vision == "lora":
        target = f"(?:{target})|(?:{_vision_target_regex(model)})"
    modules_to_save = list(PROJECTION_MODULES) if train_projections else []
    if train_vision == "full":
        modules_to_save.append("vision_model")
    modules_to_save += [name for name in extra_modules_to_save if name not in modules_to_save]
    _check_unique_suffix(model, modules_to_save)
    trainable_tokens = None
    if train_new_tokens:
        embedding_name = _module_name(model, model.get_input_embeddings())
        trainable_tokens = {embedding_name: new_token_ids(model)}
    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=target,
        modules_to_save=modules_to_save or None,
        trainable_token_indices=trainable_tokens,
        **lora_kwargs,
    )


# ---------------------------------------------------------------------------------------------- counting
def count_parameters(model: nn.Module) -> dict[str, int]:
    """`{"trainable": ..., "total": ...}` parameter counts (shared tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return {"trainable": trainable, "total": total}


# ---------------------------------------------------------------------------------------------- apply / load
def apply_lora(
    model: nn.Module,
    config: Any | None = None,
    gradient_checkpointing: bool = False,
    adapter_name: str = "default",
    **config_kwargs: Any,
) -> Any:
    """Wrap an MMGEMModel in a `peft.PeftModel` with [`mmgem_lora_config`] (or `config`).

    Args:
        model: the MMGEMModel (e.g. `AutoModel.from_pretrained(folder, trust_remote_code=True)`).
        config: a ready `LoraConfig`; default `mmgem_lora_config(model, **config_kwargs)`.
        gradient_checkpointing: enable non-reentrant gradient (activation) checkpointing on both towers first (the
            Trainer's `activation_checkpointing=True` does it too); the KV cache is switched off for training.
        adapter_name: name of the adapter.
    """
    from peft import get_peft_model

    model = _check_mmgem(model)
    if config is None:
        config = mmgem_lora_config(model, **config_kwargs)
    elif config_kwargs:
        raise ValueError(f"pass either `config` or config arguments {sorted(config_kwargs)}, not both.")
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    expose_tied_weights(model)
    targets = getattr(config, "target_modules", None)  # PEFT replaces "all-linear" by the names it found
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    warn_if_all_linear(peft_model, targets)
    record_auto_model_base(peft_model)
    record_absolute_base_path(peft_model)
    return peft_model


def record_absolute_base_path(peft_model: Any) -> None:
    """Record a base model loaded from a local folder by its absolute path in the adapter configs.

    PEFT writes the base's `name_or_path` as given (`runs/stage2`): relative to the directory the adapter was made in,
    and read as a Hub id anywhere else. A folder that exists here is what `from_pretrained` loaded, so its absolute
    path names the same base from any working directory.
    """
    for config in peft_model.peft_config.values():
        path = config.base_model_name_or_path
        if path and os.path.isdir(path) and not os.path.isabs(path):
            config.base_model_name_or_path = os.path.abspath(path)


ALL_LINEAR_WARNING = (
    "`target_modules='all-linear'` adapts {vision} linear layers of the vision tower and {heads} of the projections "
    "h1/h2/h3 besides the language model, and leaves the new [EMB]/[CAP] embedding rows untrained. For MM-GEM use "
    "`mmgem.integrations.lora.mmgem_lora_config(model)` (LoRA on the language model; projections, temperature and new "
    "token rows trained; `train_vision='lora'` to adapt the tower on purpose)."
)


def warn_if_all_linear(peft_model: Any, targets: Any) -> None:
    """Warn when PEFT's `target_modules="all-linear"` reached the vision tower and the projections."""
    if not (isinstance(targets, str) and targets.lower() == "all-linear"):
        return
    model = _unwrap(peft_model)
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    vision = sum(name.startswith("vision_model.") for name in adapted)
    heads = sum(name.split(".")[0] in PROJECTION_MODULES for name in adapted)
    if vision or heads:
        warnings.warn(ALL_LINEAR_WARNING.format(vision=vision, heads=heads), UserWarning, stacklevel=3)


def record_auto_model_base(peft_model: Any) -> None:
    """Make `peft_model.save_pretrained` record `transformers.AutoModel` as the adapter's base class.

    PEFT writes the base model's class and module into adapter_config.json (`auto_mapping`), and
    `AutoPeftModel.from_pretrained` imports that module. The module of a remote-code model is
    `transformers_modules.<folder>.<hash>.modeling_mmgem` (or `modeling_mmgem` where mmgem is installed), which does
    not exist in a fresh process; `transformers.AutoModel` does and loads the base with `trust_remote_code=True`.
    """
    from transformers import AutoModel

    peft_model._get_base_model_class = lambda is_prompt_tuning=False: AutoModel


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing on the vision tower and the language model (works with frozen inputs and
    LoRA, no `enable_input_require_grads` needed); the KV cache is turned off, as it must be during training."""
    model = _check_mmgem(model)
    enable_activation_checkpointing(model, {"use_reentrant": False})
    model.config.text_config.use_cache = False


def adapter_key_mismatch(peft_model: Any, adapter: str | Path, adapter_name: str = "default", **hub_kwargs: Any):
    """`(missing, unexpected)`: adapter keys the model expects but the saved adapter lacks, and the reverse.

    Compares the names PEFT saves for `adapter_name` (`get_peft_model_state_dict`) with the tensors stored in
    `adapter` (a folder or Hub repo id).
    """
    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights

    expected = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    stored = set(load_peft_weights(str(adapter), **hub_kwargs))
    return sorted(expected - stored), sorted(stored - expected)


def load_lora_adapter(
    base: str | Path | nn.Module,
    adapter: str | Path,
    is_trainable: bool = False,
    adapter_name: str = "default",
    strict: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    **peft_kwargs: Any,
) -> Any:
    """Load a saved MM-GEM LoRA adapter (folder or Hub repo id) onto its base model, checking every key.

    Args:
        base: the base MMGEMModel, or its folder / repo id (loaded with `AutoModel.from_pretrained(base,
            **model_kwargs)`: the installed classes; code from the repo runs only with `trust_remote_code=True` in
            `model_kwargs`).
        adapter: the adapter folder or Hub repo id (`peft_model.save_pretrained` / `push_to_hub`).
        is_trainable: load for further training (default: inference mode).
        adapter_name: name given to the adapter.
        strict: raise a ValueError if any adapter key is missing or unexpected (default). PEFT itself only warns.
        **peft_kwargs: passed to `PeftModel.from_pretrained` (e.g. `revision`, `token`).
    """
    from peft import PeftModel
    from transformers import AutoModel

    if isinstance(base, (str, Path)):
        base = AutoModel.from_pretrained(str(base), **(model_kwargs or {}))
    base = _check_mmgem(base)
    expose_tied_weights(base)
    peft_model = PeftModel.from_pretrained(
        base, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable, **peft_kwargs
    )
    hub_kwargs = {k: v for k, v in peft_kwargs.items() if k in ("revision", "token", "cache_dir", "subfolder")}
    missing, unexpected = adapter_key_mismatch(peft_model, adapter, adapter_name, **hub_kwargs)
    if strict and (missing or unexpected):
        raise ValueError(
            f"adapter {adapter} does not fit the base model: missing keys {missing[:10]}, unexpected keys "
            f"{unexpected[:10]} ({len(missing)} / {len(unexpected)} in all)."
        )
    return peft_model


__all__ = [
    "PROJECTION_MODULES",
    "adapter_key_mismatch",
    "apply_lora",
    "count_parameters",
    "enable_gradient_checkpointing",
    "expose_tied_weights",
    "language_model_target_regex",
    "load_lora_adapter",
    "mmgem_lora_config",
    "new_token_ids",
]
