"""What the MM-GEM model, processor and library share: box validation, the default caption length, and the
differences between the transformers releases MM-GEM supports (all of them kept here, in one place).

This file is remote code: it travels to the Hub with the model and processor files (they import it with a
single-dot relative import), so it imports only the standard library, torch and transformers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import GenerationMixin

# Caption length `generate` uses when neither the call nor the saved generation config sets one (transformers'
# model-agnostic default of 20 tokens in total would cut captions right after the K visual tokens).
DEFAULT_MAX_CAPTION_TOKENS = 64


# ---------------------------------------------------------------------------------------------- transformers releases
# The name `generate` stores and reads the KV cache under: `cache` since transformers 5.24, `past_key_values`
# before. Read from GenerationMixin's own signature rather than the version number, so it follows the release.
_GENERATION_INPUTS = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
CACHE_NAME = "cache" if "cache" in _GENERATION_INPUTS else "past_key_values"


def cache_argument(forward: Callable[..., Any]) -> str:
    """The keyword a language model's `forward` takes its KV cache under (`cache` from 5.24, `past_key_values`
    before; a remote-code LM may still use the old name on a new release)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def enable_activation_checkpointing(model: Any, kwargs: dict[str, Any]) -> None:
    """Gradient checkpointing under the release's name (`activation_checkpointing_enable` from 5.24; the old
    `gradient_checkpointing_enable` warns there)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def pil_image_processor_class(name: str) -> type:
    """The PIL-backed image processor class `name` (e.g. "CLIPImageProcessor"): `<name>Pil` where the release has
    separate PIL and torchvision backends, else `<name>` itself (which is PIL-backed there)."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


# The learnable log temperature is a 1-element tensor: FSDP shards tensors along their first dimension and refuses
# 0-d parameters. Folders saved before that hold it with shape (); both are read into shape (1,).
LOGIT_SCALE_KEY = "logit_scale.log_value"


def register_checkpoint_upgrades(class_names: tuple[str, ...]) -> bool:
    """Teach transformers' loader (`from_pretrained`) to read a 0-d temperature into shape (1,).

    Uses the weight-conversion registry of transformers' loader (`register_checkpoint_conversion_mapping`, the same
    on every release MM-GEM supports). Returns False where a release lacks it: new folders still load, folders
    saved with a 0-d temperature then report a size mismatch for that one key.
    """
    try:
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.core_model_loading import ConversionOps, WeightConverter
    except ImportError:
        return False

    class ReshapeToOneElement(ConversionOps):
        """Shape () -> (1,); tensors already of shape (1,) pass unchanged (and so does saving)."""

        @torch.no_grad()
        def convert(
            self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs: Any
        ) -> dict[str, torch.Tensor]:
            tensors = next(iter(input_dict.values()))
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            return {target_patterns[0]: tensor.reshape(1)}

        @property
        def reverse_op(self) -> ConversionOps:
            return self

    upgrade = WeightConverter(LOGIT_SCALE_KEY, LOGIT_SCALE_KEY, operations=[ReshapeToOneElement()])
    for name in class_names:
        # overwrite: the remote code may be imported more than once in a process (several folders, reloads).
        register_checkpoint_conversion_mapping(name, [upgrade], overwrite=True)
    return True


__all__ = [
    "CACHE_NAME",
    "DEFAULT_MAX_CAPTION_TOKENS",
    "cache_argument",
    "enable_activation_checkpointing",
    "pil_image_processor_class",
    "LOGIT_SCALE_KEY",
    "register_checkpoint_upgrades",
]
