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

from mmgem.data.formats import IndexedSource, RawSample, SourceOptions

KARPATHY_SPLITS = ("train", "restval", "val", "test")
FLICKR_IMAGE_FOLDERS = ("", "flickr30k-images", "images", "Images")


@dataclass
class CaptionedImage:
    """An image file with its reference captions."""

    path: Path
    captions: list[str]
    image_id: Any = None


def coco_captioned_images(data: dict[str, Any], root: Path, name: str) -> list[CaptionedImage]:
    """Group the annotations of a COCO captions JSON by image (file order of `images`)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise ValueError(f"{name}: expected a COCO captions JSON with 'images' and 'annotations'.")
    captions: dict[Any, list[str]] = {}
    for annotation in data["annotations"]:
        captions.setdefault(annotation.get("image_id"), []).append(annotation.get("caption"))
    return [
        CaptionedImage(root / str(image.get("file_name")), captions.get(image.get("id"), []), image.get("id"))
        for image in data["images"]
    ]


def karpathy_images(data: dict[str, Any], root: Path, splits: set[str], name: str) -> list[CaptionedImage]:
    """The Karpathy entries of `splits`, with their image paths and raw sentences."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{name}: expected a Karpathy split JSON with an 'images' list.")
    unknown = splits - set(KARPATHY_SPLITS)
    if unknown:
        raise ValueError(f"`--data-split` {sorted(unknown)} is not a Karpathy split {KARPATHY_SPLITS}.")
    folders = [""] if any(e.get("filepath") for e in data["images"][:1]) else list(FLICKR_IMAGE_FOLDERS)
    found = []
    for entry in data["images"]:
        if entry.get("split") not in splits:
            continue
        relative = Path(entry.get("filepath") or "") / str(entry.get("filename"))
        candidates = [root / folder / relative for folder in folders]
        path = next((p for p in candidates if p.is_file()), candidates[0])
        sentences = [s.get("raw") for s in entry.get("sentences") or [] if isinstance(s, dict)]
        found.append(CaptionedImage(path, sentences, entry.get("cocoid", entry.get("imgid"))))
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
        key = f"{self.name} image {image.path.name}"
        if not image.path.is_file():
            return RawSample(key, None, f"image file not found: {image.path}")
        if not image.captions:
            return RawSample(key, None, "no caption")
        return RawSample(key, {"image": str(image.path), "caption": rng.choice(image.captions)})


def coco_source(path: str, options: SourceOptions, data: dict[str, Any]) -> CaptionedImageSource:
    root = Path(options.image_root) if options.image_root else Path(path).resolve().parent
    return CaptionedImageSource(f"coco:{path}", coco_captioned_images(data, root, path), options.shuffle)


def karpathy_splits(split: str | None) -> set[str]:
    """`--data-split` -> Karpathy split names ("train" includes "restval"; "a+b" joins splits)."""
    names = set((split or "train").split("+"))
    return names | {"restval"} if "train" in names else names


def karpathy_source(path: str, options: SourceOptions, data: dict[str, Any]) -> CaptionedImageSource:
    root = Path(options.image_root) if options.image_root else Path(path).resolve().parent
    images = karpathy_images(data, root, karpathy_splits(options.split), path)
    return CaptionedImageSource(f"karpathy:{path}", images, options.shuffle)
