"""Where the images to index come from: a folder (searched recursively) or webdataset shards.

Every image has a stable key, stored as the item's `path`: the absolute file path for a folder, and
`<absolute shard path>#<sample key>.<extension>` for a sample of a shard, so a rerun recognises what is done.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import tarfile
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from modeling_mmgem.image_loading_mmgem import input_limit, load_rgb_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
TEXT_KEYS = ("txt", "caption", "text")


@dataclass
class ImageSource:
    """One image to index: its key, a loader, and facts stored beside its vectors."""

    path: str
    load: Callable[[], Image.Image]
    metadata: dict[str, Any] = field(default_factory=dict)
    replaces: bool = False  # the key is indexed, but its content changed since: the old rows must go first


def _open_rgb(data: bytes | str | os.PathLike[str]) -> Image.Image:
    return load_rgb_image(data)  # as the processor loads images: transparency onto white


def is_shard(path: str) -> bool:
    return path.lower().endswith(SHARD_EXTENSIONS)


def folder_images(root: Path) -> list[Path]:
    """The image files under `root` (recursive, hidden folders skipped), sorted."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [Path(directory) / f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def shard_urls(spec: str) -> list[str]:
    """The shard files named by `spec`: one file, a brace pattern (`data-{000..009}.tar`) or a glob."""
    try:
        import braceexpand
    except ImportError:
        raise ValueError(
            f'`--images` {spec} names webdataset shards, which need the search extra: pip install "mmgem[search]".'
        ) from None

    urls = []
    for pattern in braceexpand.braceexpand(spec):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        urls += [str(Path(m).resolve()) for m in matches]
    return urls


def resolve_images(spec: str) -> tuple[str, list[str]]:
    """("folder", [root]) or ("shards", urls) for the `--images` argument, checked before any work."""
    path = Path(spec)
    if path.is_dir():
        if folder_images(path):
            return "folder", [str(path.resolve())]
        shards = sorted(str(p.resolve()) for p in path.iterdir() if is_shard(p.name))
        if shards:
            return "shards", shards
        raise ValueError(f"`--images` folder {spec} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no shards.")
    if is_shard(spec) or "{" in spec or glob.has_magic(spec):
        urls = shard_urls(spec)
        missing = [u for u in urls if not Path(u).is_file()]
        if not urls or missing:
            raise ValueError(f"`--images` names shards that do not exist: {missing[:3] or spec}.")
        return "shards", urls
    raise ValueError(f"`--images` must be a folder of images or webdataset shards (.tar, a brace pattern); got {spec}.")


def iter_folder(root: str) -> Iterator[ImageSource]:
    for file in folder_images(Path(root)):
        stat = file.stat()
        yield ImageSource(
            str(file), load=lambda f=file: _open_rgb(f), metadata={"bytes": stat.st_size, "mtime": stat.st_mtime}
        )


def member_digest(data: bytes) -> str:
    """A short content hash of a shard member, stored with its rows to notice a shard rewritten with new content."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def iter_shards(urls: list[str], skip: Collection[str] | Mapping[str, dict] = frozenset()) -> Iterator[ImageSource]:
    """The image samples of webdataset shards, in order; samples whose key is in `skip` are not decoded. With a
    mapping (key -> the item indexed for it), a key whose member changed (digest, else size) is yielded again, marked
    `replaces`."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for sample in dataset:
        extension = next((e for e in sample if "." + e in IMAGE_EXTENSIONS), None)
        if extension is None:
            continue
        key = f"{sample['__url__']}#{sample['__key__']}.{extension}"
        data = sample[extension]
        replaces = False
        if key in skip:
            indexed = skip[key] if isinstance(skip, Mapping) else None
            if indexed is None or (indexed.get("digest", member_digest(data)), indexed.get("bytes")) == (
                member_digest(data),
                len(data),
            ):
                continue
            replaces = True
        metadata: dict[str, Any] = {"bytes": len(data), "digest": member_digest(data)}
        text_key = next((t for t in TEXT_KEYS if t in sample), None)
        if text_key is not None:
            metadata["text"] = sample[text_key].decode("utf-8", errors="replace").strip()
        yield ImageSource(key, load=lambda data=data: _open_rgb(data), metadata=metadata, replaces=replaces)


def member_name(name: str) -> str:
    """A tar member's name without the `./` that `tar -C dir -cf x.tar .` puts in front (webdataset keeps it in
    the sample key, so both sides of a lookup go through this)."""
    while name.startswith("./"):
        name = name[2:]
    return name


@functools.lru_cache(maxsize=8)
def _shard_members(shard: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """{member name: (offset of its data, size)} of an uncompressed shard, read once per shard version (size and
    mtime are part of the key, so a rewritten shard is read again)."""
    with tarfile.open(shard) as tar:
        return {member_name(m.name): (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def read_shard_member(shard: str, member: str) -> bytes:
    """The bytes of `member` of a shard; a KeyError naming both when the shard has no such member."""
    member = member_name(member)
    if not shard.lower().endswith(".tar"):  # compressed: no random access, read through the stream
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.isfile() and member_name(info.name) == member:
                    return tar.extractfile(info).read()
        raise KeyError(f"{shard} has no member {member!r}")
    info = os.stat(shard)
    location = _shard_members(shard, info.st_size, info.st_mtime_ns).get(member)
    if location is None:
        raise KeyError(f"{shard} has no member {member!r}")
    offset, size = location
    if size > input_limit("max_image_bytes"):  # before reading it
        raise ValueError(f"{shard}#{member} has {size:,} bytes, more than MMGEM_MAX_IMAGE_BYTES.")
    with open(shard, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def load_image(path: str) -> Image.Image:
    """The image an item's `path` names (a file, or `shard.tar#key.ext`), as RGB."""
    if "#" in path and is_shard(path.split("#", 1)[0]):
        shard, member = path.split("#", 1)
        return _open_rgb(read_shard_member(shard, member))
    return _open_rgb(path)
