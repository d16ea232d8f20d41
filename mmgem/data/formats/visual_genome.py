"""Visual Genome `region_descriptions.json`: `[{"id": image_id, "regions": [{"region_id", "image_id", "phrase", "x",
"y", "width", "height"}, ...]}, ...]`, boxes in pixels as x, y (top-left), width, height.

Images are `<image_id>.jpg` under `--image-root` (default: the JSON's folder), directly or in `VG_100K/` /
`VG_100K_2/` as the download unpacks them. A box becomes `[x, y, x + width, y + height]`. Visual Genome's boxes
may overhang the image border by a few pixels by construction (annotators drew past the edge), so they are clipped
to the image; a box with no area left inside it is a bad record. VG has no image caption: the largest region's
phrase serves as one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from mmgem.data.formats import IndexedSource, RawSample, SourceOptions, largest_region_caption, xywh_to_xyxy

IMAGE_FOLDERS = ("", "VG_100K", "VG_100K_2", "images")


class VisualGenomeSource(IndexedSource):
    """One sample per image with all its region descriptions."""

    def __init__(self, path: str, options: SourceOptions, entries: list[Any]) -> None:
        self.name = f"visual-genome:{path}"
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of {{'id', 'regions'}} objects.")
        self.entries = entries
        self.root = Path(options.image_root) if options.image_root else Path(path).resolve().parent
        self.shuffle = options.shuffle

    def __len__(self) -> int:
        return len(self.entries)

    def _image(self, image_id: Any) -> Path | None:
        for folder in IMAGE_FOLDERS:
            path = self.root / folder / f"{image_id}.jpg"
            if path.is_file():
                return path
        return None

    def sample(self, index: int, rng: random.Random) -> RawSample:
        entry = self.entries[index]
        if not isinstance(entry, dict):
            return RawSample(f"{self.name} entry {index}", None, f"a {type(entry).__name__} (expected an object)")
        image_id = entry.get("id", entry.get("image_id"))
        key = f"{self.name} image {image_id}"
        path = self._image(image_id)
        if path is None:
            return RawSample(key, None, f"no image {image_id}.jpg under {self.root} (or {IMAGE_FOLDERS[1:]})")
        regions = []
        for number, region in enumerate(entry.get("regions") or []):
            box = xywh_to_xyxy([region.get(k) for k in ("x", "y", "width", "height")])
            if box is None:
                return RawSample(key, None, f"region {number}: x, y, width, height are not 4 numbers")
            regions.append({"box": box, "caption": (region.get("phrase") or "").strip()})
        raw = {"image": str(path), "caption": largest_region_caption(regions), "regions": regions, "clip_boxes": True}
        return RawSample(key, raw)
