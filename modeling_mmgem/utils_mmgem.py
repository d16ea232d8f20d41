"""What the MM-GEM model, processor and library share: box validation, the default caption length, and the
differences between the transformers releases MM-GEM supports (all of them kept here, in one place).

This file is remote code: it travels to the Hub with the model and processor files (they import it with a
single-dot relative import), so it imports only the standard library, torch and transformers.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import GenerationMixin

# Caption length `generate` uses when neither the call nor the saved generation config sets one (transformers'
# model-agnostic default of 20 tokens in total would cut captions right after the K visual tokens).
DEFAULT_MAX_CAPTION_TOKENS = 64


# ---------------------------------------------------------------------------------------------- input limits
# Caps on what one input may cost, each overridable with an environment variable (read at every call). A small
# file can decode to a huge image (a 300 KB PNG of 1 x 100,000 pixels resizes to 1.4 GB for a 224 px tower), and
# region pooling copies the feature map once per box.
INPUT_LIMITS = {
    "max_image_pixels": ("MMGEM_MAX_IMAGE_PIXELS", 64_000_000),  # width * height of one image (8000 x 8000)
    "max_aspect_ratio": ("MMGEM_MAX_ASPECT_RATIO", 32.0),  # long side / short side
    "max_boxes_per_image": ("MMGEM_MAX_BOXES_PER_IMAGE", 512),
    "image_url_timeout": ("MMGEM_IMAGE_URL_TIMEOUT", 10.0),  # seconds for a whole image download
    "max_image_bytes": ("MMGEM_MAX_IMAGE_BYTES", 64 * 2**20),  # an encoded image (file, URL, base64, bytes)
}


def input_limit(name: str) -> float:
    """The current value of the input limit `name` (see `INPUT_LIMITS`): its environment variable, else the
    default."""
    variable, default = INPUT_LIMITS[name]
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"The environment variable {variable} must be a positive number; got {value!r}.") from None
    if number <= 0:
        raise ValueError(f"The environment variable {variable} must be a positive number; got {value!r}.")
    return number


def image_size_problem(width: int, height: int) -> str | None:
    """Why a `width x height` image is refused (too many pixels, too elongated, empty), or None."""
    if width < 1 or height < 1:
        return f"is empty ({width}x{height} pixels)"
    max_pixels, max_ratio = input_limit("max_image_pixels"), input_limit("max_aspect_ratio")
    if width * height > max_pixels:
        return (
            f"has {width}x{height} = {width * height:,} pixels, more than the {int(max_pixels):,} allowed "
            "(MMGEM_MAX_IMAGE_PIXELS); resize it first"
        )
    if max(width, height) / min(width, height) > max_ratio:
        return (
            f"is {width}x{height} pixels, an aspect ratio above the {max_ratio:g} allowed (MMGEM_MAX_ASPECT_RATIO): "
            "the resize to the model's input would make it huge; crop it first"
        )
    return None


def too_many_boxes(count: int) -> str | None:
    """Why `count` boxes for one image are refused, or None."""
    limit = int(input_limit("max_boxes_per_image"))
    if count > limit:
        return f"has {count} boxes, more than the {limit} allowed per image (MMGEM_MAX_BOXES_PER_IMAGE)"
    return None


# ---------------------------------------------------------------------------------------------- boxes
def box_problem(
    boxes: Any,
    width: float | None = 1.0,
    height: float | None = 1.0,
    frame: str = "image",
    tolerance: float = 0.0,
) -> str | None:
    """Why `boxes` are not valid xyxy boxes of a `width x height` frame, or None when they are.

    The one box check of MM-GEM: the data records (pixel boxes of the original image), the processor (the same,
    before it maps them to the model's frame) and the model (boxes normalised to the `1 x 1` frame of
    `pixel_values`) all call it. A valid box has 4 finite numbers `x0, y0, x1, y1` with `0 <= x0 < x1 <= width` and
    `0 <= y0 < y1 <= height` (right and bottom edges exclusive, as `PIL.Image.getbbox`).

    Args:
        boxes: one box (4 numbers) or several (`[R, 4]`: nested lists, numpy array or tensor).
        width, height: size of the frame; None skips the bounds check (e.g. the image size is unknown).
        frame: how the problem names the frame (`"32x24 image"` gives "... is outside the 32x24 image").
        tolerance: how far a box may cross the frame's border (rounding of boxes that touch it).

    Returns:
        A phrase to follow the boxes' name in an error message (e.g. "has zero or negative area"), or None.
    """
    if isinstance(boxes, (list, tuple)) and any(_has_non_number(item) for item in boxes):
        return "is not 4 numbers"
    try:
        array = torch.as_tensor(boxes, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return "is not 4 numbers"
    if array.ndim == 1 and array.numel():
        array = array[None]
    if array.numel() == 0:
        return None  # no box: nothing to check
    if array.ndim != 2 or array.shape[-1] != 4:
        return f"is not 4 numbers per box (shape {tuple(array.shape)})"
    if not torch.isfinite(array).all():
        return "contains NaN or inf"
    x0, y0, x1, y1 = array.unbind(-1)
    if ((x1 <= x0) | (y1 <= y0)).any():
        return "has zero or negative area"
    if width is not None and height is not None:
        low, right, bottom = -tolerance, width + tolerance, height + tolerance
        if ((x0 < low) | (y0 < low) | (x1 > right) | (y1 > bottom)).any():
            return f"is outside the {frame}"
    return None


def _has_non_number(value: Any) -> bool:
    """Whether (nested lists of) numbers hold something else: a string, a boolean, None or an empty list."""
    if isinstance(value, (list, tuple)):
        return len(value) == 0 or any(_has_non_number(item) for item in value)
    if isinstance(value, (bool, str, bytes)) or value is None:
        return True
    return False


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
        def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str],
                    **kwargs: Any) -> dict[str, torch.Tensor]:  # fmt: skip
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
    "INPUT_LIMITS",
    "box_problem",
    "image_size_problem",
    "input_limit",
    "too_many_boxes",
    "cache_argument",
    "enable_activation_checkpointing",
    "pil_image_processor_class",
    "LOGIT_SCALE_KEY",
    "register_checkpoint_upgrades",
]
