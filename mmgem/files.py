"""Atomic file writes: a reader sees the old file or the new one, never half of one, and the new file gets the
permissions any new file gets (0666 minus the umask, usually 0644), not the owner-only mode of a temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _usual_mode() -> int:
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def give_usual_mode(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Give files the mode any new file gets (0666 minus the umask): for writers that leave theirs owner-only
    (safetensors writes `model.safetensors` 0600 through a temporary file)."""
    mode = _usual_mode()
    for path in paths:
        os.chmod(path, mode)


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp", durable: bool = False) -> Iterator[Path]:
    """A temporary path next to `path` to write to; renamed over `path` when the block ends without an error,
    removed when it raises.

    Args:
        path: the file to write (its folder is created).
        suffix: ending of the temporary name (e.g. ".png", for writers that pick the format from the name).
        durable: flush the file to disk before the rename (for stores that must survive a power cut).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, _usual_mode())  # mkstemp made it readable by its owner only
        if durable:
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, durable: bool = False) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path, durable=durable) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically; returns the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(
    path: str | os.PathLike[str], value: Any, indent: int | None = 2, sort_keys: bool = False
) -> Path:
    """Write `value` as JSON (with a final newline) to `path` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


__all__ = ["atomic_path", "give_usual_mode", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]
