"""Optional dependencies: import one, or say which extra of mmgem installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise an ImportError naming `purpose` and the `pip install "mmgem[extra]"` that fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f'{purpose} needs the package {module.split(".")[0]!r}: pip install "mmgem[{extra}]".'
        ) from error
