"""COCO captions (`captions_train2017.json`) and the Karpathy splits (`dataset_coco.json`, `dataset_flickr30k.json`).

- COCO captions: `{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption", ...}]}`; images
  under `--image-root` (e.g. `train2017/`). One sample per image; one of its captions is drawn per epoch.
- Karpathy: `{"images": [{"filepath" (COCO only: "train2014"/"val2014"), "filename", "split" ("train", "restval",
  "val", "test"), "sentences": [{"raw", "tokens"}, ...]}], "dataset"}`; images at `root/filepath/filename`
  (Flickr30k: `root/filename`, or `root/flickr30k-images/filename`). `--data-split train` (the default) takes
  "train" and "restval", as the usual Karpathy training set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgem.data.formats import IndexedSource, RawSample, SourceOptions, type_problem
from mmgem.data.paths import resolve_in_root

KARPATHY_SPLITS = ("train", "restval", "val", "test")
FLICKR_IMAGE_FOLDERS = ("", "flickr30k-images", "images", "Images")


@dataclass
class CaptionedImage:
    """An image file with its reference captions, or an unusable entry (`path` None and `problem` saying why:
    it is reported, or skipped and counted, when its turn comes, as a bad sample of any other format)."""

    path: Path | None
    captions: list[Any]
    image_id: Any = None
    label: str = ""
    problem: str | None = None


def _entry_key(value: Any) -> Any:
    """An id usable as a dict key (int or str), else None."""
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def coco_captioned_images(
    data: dict[str, Any], root: Path, name: str, allow_outside: bool = False
) -> list[CaptionedImage]:
    """Group the annotations of a COCO captions JSON by image (file order of `images`); entries of the wrong type
    and annotations that name no image id become unusable entries (after the images)."""
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise ValueError(f"{name}: expected a COCO captions JSON with 'images' and 'annotations' lists.")
    captions: dict[Any, list[Any]] = {}
    unusable = []
    for number, annotation in enumerate(data["annotations"]):
        label = f"annotations[{number}]"
        problem = type_problem(annotation, dict, label)
        image_id = _entry_key(annotation.get("image_id")) if problem is None else None
        if problem is None and image_id is None:
            problem = f"{label}: image_id {str(annotation.get('image_id'))[:80]!r} is not an integer or string"
        if problem:
            unusable.append(CaptionedImage(None, [], label=label, problem=problem))
            continue
        captions.setdefault(image_id, []).append(annotation.get("caption"))
    found = []
    for number, image in enumerate(data["images"]):
        label = f"images[{number}]"
        if not isinstance(image, dict):
            found.append(CaptionedImage(None, [], label=label, problem=f"{type_problem(image, dict, label)}"))
            continue
        image_id = _entry_key(image.get("id"))
        path, problem = resolve_in_root(root, image.get("file_name"), allow_outside=allow_outside, what='"file_name"')
        found.append(CaptionedImage(path, captions.get(image_id, []), image_id, label=label, problem=problem))
    return found + unusable


def karpathy_images(
    data: dict[str, Any], root: Path, splits: set[str], name: str, allow_outside: bool = False
) -> list[CaptionedImage]:
    """The Karpathy entries of `splits`, with their image paths and raw sentences (an entry of the wrong type, or
    whose path leaves the data root, is an unusable entry)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{name}: expected a Karpathy split JSON with an 'images' list.")
    unknown = splits - set(KARPATHY_SPLITS)
    if unknown:
        raise ValueError(f"`--data-split` {sorted(unknown)} is not a Karpathy split {KARPATHY_SPLITS}.")
    first = next((e for e in data["images"] if isinstance(e, dict)), {})
    folders = [""] if first.get("filepath") else list(FLICKR_IMAGE_FOLDERS)
    found = []
    for number, entry in enumerate(data["images"]):
        label = f"images[{number}]"
        if not isinstance(entry, dict):
            found.append(CaptionedImage(None, [], label=label, problem=f"{type_problem(entry, dict, label)}"))
            continue
        if _entry_key(entry.get("split")) not in splits:
            continue
        filepath, filename = entry.get("filepath") or "", entry.get("filename")
        if not isinstance(filepath, str) or not isinstance(filename, str):
            problem = f'"filepath" / "filename" are {type(filepath).__name__} / {type(filename).__name__} (strings)'
            found.append(CaptionedImage(None, [], label=label, problem=problem))
            continue
        relative = str(Path(filepath) / filename) if filename else ""
        candidates = [
            resolve_in_root(
                root, str(Path(f) / relative) if f else relative, allow_outside=allow_outside, what='"filename"'
            )
            for f in folders
        ]
        path, problem = next(((p, q) for p, q in candidates if p is not None and p.is_file()), candidates[0])
        sentences = entry.get("sentences")
        sentences = [s.get("raw") for s in sentences if isinstance(s, dict)] if isinstance(sentences, list) else []
        image_id = _entry_key(entry.get("cocoid", entry.get("imgid")))
        found.append(CaptionedImage(path, sentences, image_id, label=label, problem=problem))
    return found


class CaptionedImageSource(IndexedSource):
    """Images with several captions, one drawn per epoch."""

    def __init__(self, name: str, images: list[CaptionedImage], shuffle: bool = True) -> None:
        self.name = name
        self.images = images
        self.shuffle = shuffle

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int, rng: random.Random) -> RawSample:
        image = self.images[index]
        if image.path is None or image.problem:
            return RawSample(f"{self.name} {image.label}", None, image.problem or "no image")
        key = f"{self.name} image {image.path.name}"
        if not image.path.is_file():
            return RawSample(key, None, f"image file not found: {image.path}")
        if not image.captions:
            return RawSample(key, None, "no caption")
        return RawSample(key, {"image": str(image.path), "caption": rng.choice(image.captions)})


def coco_source(path: str, options: SourceOptions, data: dict[str, Any]) -> CaptionedImageSource:
    root = options.data_root(Path(path).resolve().parent)
    images = coco_captioned_images(data, root, path, options.allow_outside_data_root)
    return CaptionedImageSource(f"coco:{path}", images, options.shuffle)


def karpathy_splits(split: str | None) -> set[str]:
    """`--data-split` -> Karpathy split names ("train" includes "restval"; "a+b" joins splits)."""
    names = set((split or "train").split("+"))
    return names | {"restval"} if "train" in names else names


def karpathy_source(path: str, options: SourceOptions, data: dict[str, Any]) -> CaptionedImageSource:
    root = options.data_root(Path(path).resolve().parent)
    images = karpathy_images(data, root, karpathy_splits(options.split), path, options.allow_outside_data_root)
    return CaptionedImageSource(f"karpathy:{path}", images, options.shuffle)
