"""The data-root rule, one for every data format (and for the folders `mmgem index` reads).

A path read from data (a JSONL "image", COCO `file_name`, LLaVA `image`, Karpathy `filepath`/`filename`, a Visual
Genome image id, a RefCOCO `file_name`, a path in a datasets / parquet column) is relative to the data root: the
folder of the annotation file, or `--image-root` when given. It must stay inside that root once `..` and symbolic
links are resolved: an absolute path, a `../` path or a symlink that leads out is refused with a problem naming
the value and the root, unless the user opts in with `--allow-outside-data-root` (`allow_outside=True`). A hostile
annotation file then cannot make training or the app read, embed or show any file the process can read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

OPT_IN = "pass --allow-outside-data-root to read such paths anyway"


OUTSIDE = "leads outside the data folder"


def outside_problem(value: Any, root: str | os.PathLike[str]) -> str:
    """The problem of a path that leads outside `root` (the wording every format uses; the opt-in is named once per
    report by :func:`opt_in_hint`, not in every problem)."""
    return f"path {str(value)[:200]!r} {OUTSIDE} {root}"


def opt_in_hint(problems: list[str]) -> str:
    """The opt-in hint for a report whose `problems` include a path outside the root, else ""."""
    return f" (paths must stay inside the data folder; {OPT_IN})" if any(OUTSIDE in p for p in problems) else ""


def is_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether `path`, with `..` and every symbolic link resolved, lies inside `root` (resolved too)."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, or a NUL byte in the path
        return False


def resolve_in_root(
    root: str | os.PathLike[str], value: Any, *, allow_outside: bool = False, what: str = "image"
) -> tuple[Path | None, str | None]:
    """`root / value` under the data-root rule: (the path, None), or (None, the problem).

    `value` must be a non-empty string (a path relative to `root`); the file is not opened or required to exist.
    """
    if not isinstance(value, str) or not value.strip():
        return None, f"missing {what} path (expected a path relative to {root}, got {value!r})"
    if "\x00" in value:
        return None, f"{what} path {value!r} holds a NUL character"
    path = Path(root) / value
    if not allow_outside and not is_inside(path, root):
        return None, outside_problem(value, root)
    return path, None


__all__ = ["OPT_IN", "OUTSIDE", "is_inside", "opt_in_hint", "outside_problem", "resolve_in_root"]
