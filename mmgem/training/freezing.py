"""Which parts of an MMGEMModel train: the one freezing helper (full fine-tuning; under PEFT, the LoRA config
decides, see `mmgem.integrations.lora`)."""

from __future__ import annotations

from typing import Any

from torch import nn

# The parts of an MMGEMModel, by the names of their top-level modules.
VISION_MODULES = ("vision_model",)
LANGUAGE_MODEL_MODULES = ("language_model",)
# h1 / h2 / h3 and the temperature: small, newly initialised in a fresh MM-GEM.
PROJECTION_MODULES = ("image_projection", "visual_token_projection", "text_projection", "logit_scale")


def set_requires_grad(module: nn.Module, requires_grad: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter of `module`."""
    for parameter in module.parameters():
        parameter.requires_grad_(requires_grad)


def freeze(
    model: Any, vision: bool | None = None, language_model: bool | None = None, projections: bool | None = None
) -> None:
    """Freeze (True) or make trainable (False) parts of an MMGEMModel for full fine-tuning: the vision tower, the
    LM, h1/h2/h3 and the temperature; a part given as None is left as it is. (Under PEFT, the LoRA config decides:
    `mmgem_lora_config(..., train_vision="lora" | "full")`.)"""
    parts = ((vision, VISION_MODULES), (language_model, LANGUAGE_MODEL_MODULES), (projections, PROJECTION_MODULES))
    for frozen, names in parts:
        if frozen is None:
            continue
        for name in names:
            set_requires_grad(getattr(model, name), not frozen)


__all__ = ["PROJECTION_MODULES", "freeze", "set_requires_grad"]
