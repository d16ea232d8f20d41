"""The images of a collection, named by stable keys that any worker can open on its own.

A collection is a folder of image files (searched recursively), webdataset shards (`.tar`, a brace pattern or a
folder of them) or parquet files (a file, or a folder such as a Hub dataset's `data/`) with an image column of
encoded bytes. Keys are what the outputs store as `image_path`:

- folder: the absolute file path;
- shard: `<absolute shard>#<member>` (the member name inside the tar);
- parquet: `<absolute file>#<row>`.

The driver lists keys only (file names, tar headers, parquet row counts); images are read where they are embedded,
through :class:`ImageReader`, which indexes each shard or parquet file once per worker.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

from mmgem.search.sources import IMAGE_EXTENSIONS, TEXT_KEYS, folder_images, is_shard, shard_urls

PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img")
PARQUET_TEXT_COLUMNS = ("caption", "text", "txt")


def _is_parquet(path: str | Path) -> bool:
    return str(path).lower().endswith(".parquet")


def list_keys(spec: str) -> list[str]:
    """The sorted keys of the collection `spec` (see the module docstring); a clear error when it holds none."""
    path = Path(spec)
    if path.is_dir():
        files = folder_images(path)
        if files:
            return [str(f.resolve()) for f in files]
        shards = sorted(p for p in path.rglob("*") if is_shard(p.name))
        if shards:
            return _shard_keys([str(p.resolve()) for p in shards])
        tables = sorted(p for p in path.rglob("*.parquet") if not any(part.startswith(".") for part in p.parts))
        if tables:
            return _parquet_keys([str(p.resolve()) for p in tables])
        raise ValueError(
            f"`--images` folder {spec} holds no images ({', '.join(IMAGE_EXTENSIONS)}), shards or parquet."
        )
    if _is_parquet(spec) and path.is_file():
        return _parquet_keys([str(path.resolve())])
    if is_shard(spec) or "{" in spec or any(c in spec for c in "*?["):
        urls = shard_urls(spec)
        missing = [u for u in urls if not Path(u).is_file()]
        if not urls or missing:
            raise ValueError(f"`--images` names shards that do not exist: {missing[:3] or spec}.")
        return _shard_keys(urls)
    raise ValueError(
        f"`--images` must be an image folder, webdataset shards (.tar, a brace pattern) or parquet; got {spec}."
    )


def _shard_keys(urls: list[str]) -> list[str]:
    keys = []
    for url in urls:
        with tarfile.open(url) as tar:
            keys += [
                f"{url}#{m.name}" for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(IMAGE_EXTENSIONS)
            ]
    if not keys:
        raise ValueError(f"`--images` shards {urls[:3]} hold no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return keys


def _parquet_keys(files: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    keys = []
    for file in files:
        names = pq.read_schema(file).names
        if not any(c in names for c in PARQUET_IMAGE_COLUMNS):
            raise ValueError(f"`--images` parquet {file} has no image column (one of {PARQUET_IMAGE_COLUMNS}).")
        width = len(str(pq.ParquetFile(file).metadata.num_rows))
        keys += [f"{file}#{row:0{width}d}" for row in range(pq.ParquetFile(file).metadata.num_rows)]
    return keys


def _read_at(handle: Any, offset: int, size: int) -> bytes:
    handle.seek(offset)
    return handle.read(size)


class ImageReader:
    """Opens the image a key names, and the text stored beside it (a shard's `.txt`, a parquet caption column).

    Each shard's member table and each parquet file's rows are read once and kept (one file at a time), so a batch
    of keys from one shard costs one pass over its headers.
    """

    def __init__(self) -> None:
        self._file: str | None = None
        self._table: Any = None

    def read(self, key: str) -> tuple[bytes | str, str | None]:
        """(the image as a path or encoded bytes, its text or None)."""
        if "#" not in key:
            return key, None
        file, member = key.rsplit("#", 1)
        if _is_parquet(file):
            return self._parquet_row(file, int(member))
        return self._shard_member(file, member)

    def _open(self, file: str) -> Any:
        if self._file != file:
            if _is_parquet(file):
                import pyarrow.parquet as pq

                self._table = pq.read_table(file)
            else:
                with tarfile.open(file) as tar:  # where each member's bytes are: read later by seeking
                    self._table = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
            self._file = file
        return self._table

    def _shard_member(self, file: str, member: str) -> tuple[bytes, str | None]:
        members = self._open(file)
        stem = member.rsplit(".", 1)[0]
        text_name = next((f"{stem}.{t}" for t in TEXT_KEYS if f"{stem}.{t}" in members), None)
        with open(file, "rb") as handle:
            data = _read_at(handle, *members[member])
            text = None if text_name is None else _read_at(handle, *members[text_name]).decode("utf-8", "replace")
        return data, None if text is None else text.strip()

    def _parquet_row(self, file: str, row: int) -> tuple[bytes, str | None]:
        table = self._open(file)
        column = next(c for c in PARQUET_IMAGE_COLUMNS if c in table.column_names)
        value = table.column(column)[row].as_py()
        if isinstance(value, dict):  # the `datasets` Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        text_column = next((c for c in PARQUET_TEXT_COLUMNS if c in table.column_names), None)
        text = table.column(text_column)[row].as_py() if text_column else None
        return value, None if text is None else str(text)
