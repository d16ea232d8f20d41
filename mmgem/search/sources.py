"""Where the images to index come from: a folder (searched recursively) or webdataset shards.

Every image has a stable key, stored as the item's `path`: the absolute file path for a folder, and
`<absolute shard path>#<sample key>.<extension>` for a sample of a shard, so a rerun recognises what is done.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from modeling_mmgem.processing_mmgem import load_rgb_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
TEXT_KEYS = ("txt", "caption", "text")


@dataclass
class ImageSource:
    """One image to index: its key, a loader, and facts stored beside its vectors."""

    path: str
    load: Callable[[], Image.Image]
    metadata: dict[str, Any] = field(default_factory=dict)


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
        raise ValueError(f"`--images` {spec} names webdataset shards, which need the search extra: "
                         'pip install "mmgem[search]".') from None  # fmt: skip

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
        yield ImageSource(str(file), load=lambda f=file: _open_rgb(f),
                          metadata={"bytes": stat.st_size, "mtime": stat.st_mtime})  # fmt: skip


def iter_shards(urls: list[str], skip: set[str] = frozenset()) -> Iterator[ImageSource]:
    """The image samples of webdataset shards, in order; samples whose key is in `skip` are not decoded."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for sample in dataset:
        extension = next((e for e in sample if "." + e in IMAGE_EXTENSIONS), None)
        if extension is None:
            continue
        key = f"{sample['__url__']}#{sample['__key__']}.{extension}"
        if key in skip:
            continue
        metadata: dict[str, Any] = {"bytes": len(sample[extension])}
        text_key = next((t for t in TEXT_KEYS if t in sample), None)
        if text_key is not None:
            metadata["text"] = sample[text_key].decode("utf-8", errors="replace").strip()
        yield ImageSource(key, load=lambda data=sample[extension]: _open_rgb(data), metadata=metadata)


def load_image(path: str) -> Image.Image:
    """The image an item's `path` names (a file, or `shard.tar#key.ext`), as RGB."""
    if "#" in path and is_shard(path.split("#", 1)[0]):
        shard, member = path.split("#", 1)
        with tarfile.open(shard) as tar:
            names = {m.name.lstrip("./"): m for m in tar.getmembers()}
            handle = tar.extractfile(names[member])
            return _open_rgb(handle.read())
    return _open_rgb(path)
