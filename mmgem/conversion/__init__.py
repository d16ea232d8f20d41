"""Conversion and publishing of MM-GEM models (not remote code: runs where mmgem is installed).

- `convert`: compose an MM-GEM from a CLIP/SigLIP vision tower and a causal LM, write one complete Hub folder.
- `export_checkpoint`: the same for a trained checkpoint (saved model, LoRA adapter to merge, or state dict).
- `push_folder`: upload such a folder to the Hub in one commit.
- `main`: the command line (`mmgem-convert`, or `python -m mmgem.conversion.convert_mmgem`).

The names are imported lazily, so that `python -m mmgem.conversion.convert_mmgem` does not import the module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = ("HubPushError", "convert", "export_checkpoint", "main", "push_folder")

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".convert_mmgem", __name__), name)
    globals()[name] = value
    return value
