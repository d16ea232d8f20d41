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
from mmgem.data.paths import resolve_in_root

IMAGE_FOLDERS = ("", "VG_100K", "VG_100K_2", "images")


class VisualGenomeSource(IndexedSource):
    """One sample per image with all its region descriptions."""

    def __init__(self, path: str, options: SourceOptions, entries: list[Any]) -> None:
        self.name = f"visual-genome:{path}"
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of {{'id', 'regions'}} objects.")
        self.entries = entries
        self.root = options.data_root(Path(path).resolve().parent)
        self.allow_outside = options.allow_outside_data_root
        self.shuffle = options.shuffle

    def __len__(self) -> int:
        return len(self.entries)

    def _image(self, image_id: Any) -> tuple[Path | None, str | None]:
        """The image file of `image_id` under the data root, or None and the problem."""
        if not isinstance(image_id, int | str) or isinstance(image_id, bool):
            return None, f"image id {str(image_id)[:80]!r} is not an integer or string"
        problem = None
        for folder in IMAGE_FOLDERS:
            relative = f"{folder}/{image_id}.jpg" if folder else f"{image_id}.jpg"
            path, problem = resolve_in_root(self.root, relative, allow_outside=self.allow_outside)
            if path is None:
                return None, problem  # an id such as "../../x" leaves the root whichever folder it is in
            if path.is_file():
                return path, None
        return None, f"no image {image_id}.jpg under {self.root} (or {IMAGE_FOLDERS[1:]})"

    def sample(self, index: int, rng: random.Random) -> RawSample:
        entry = self.entries[index]
        if not isinstance(entry, dict):
            return RawSample(f"{self.name} entry {index}", None, f"a {type(entry).__name__} (expected an object)")
        image_id = entry.get("id", entry.get("image_id"))
        key = f"{self.name} image {str(image_id)[:80]}"
        path, problem = self._image(image_id)
        if path is None:
            return RawSample(key, None, problem)
        entry_regions = entry.get("regions")
        if entry_regions is not None and not isinstance(entry_regions, list):
            return RawSample(key, None, f'"regions" is a {type(entry_regions).__name__} (expected a list)')
        regions = []
        for number, region in enumerate(entry_regions or []):
            if not isinstance(region, dict):
                return RawSample(key, None, f"region {number} is a {type(region).__name__} (expected an object)")
            box = xywh_to_xyxy([region.get(k) for k in ("x", "y", "width", "height")])
            if box is None:
                return RawSample(key, None, f"region {number}: x, y, width, height are not 4 numbers")
            phrase = region.get("phrase")
            regions.append({"box": box, "caption": phrase.strip() if isinstance(phrase, str) else phrase})
        raw = {"image": str(path), "caption": largest_region_caption(regions), "regions": regions, "clip_boxes": True}
        return RawSample(key, raw)
