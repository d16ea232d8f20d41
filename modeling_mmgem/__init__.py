"""mmgem: MM-GEM (arXiv 2405.19333) as a Hugging Face model.

The remote-code files (`configuration_mmgem.py`, `modeling_mmgem.py`, `processing_mmgem.py` and the
`loss_mmgem.py` they import) are what `save_pretrained` copies next to the weights; the rest of the package
(building, data, training, evaluation) runs where mmgem is installed.

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
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value
