"""modeling_mmgem: MM-GEM (arXiv 2405.19333) as a Hugging Face model.

This folder holds exactly the remote code that `save_pretrained` copies next to the weights
(`configuration_mmgem.py`, `modeling_mmgem.py`, `processing_mmgem.py`, `pipeline_mmgem.py` and the
`image_loading_mmgem.py`, `loss_mmgem.py` and `utils_mmgem.py` they import): it imports only the standard library,
torch and transformers (and numpy / PIL, which transformers' image processors use). The library around it (building,
data, training, evaluation, integrations) is the `mmgem` package, which imports this one, never the reverse.

The public names are imported lazily, so that light tools (the dataset generator, the CLI's help) start without
importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "MMGEMConfig": ".configuration_mmgem",
    "MMGEMFeaturesOutput": ".modeling_mmgem",
    "MMGEMModel": ".modeling_mmgem",
    "MMGEMOutput": ".modeling_mmgem",
    "MMGEMPreTrainedModel": ".modeling_mmgem",
    "MMGEMProcessor": ".processing_mmgem",
    "add_mmgem_special_tokens": ".processing_mmgem",
    "load_rgb_image": ".image_loading_mmgem",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value
