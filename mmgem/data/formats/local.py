"""The project's own formats as sources: a JSON Lines file and an imagefolder (see `mmgem.data.records`).

Both are validated whole when opened, by the loaders of `mmgem.data.records` (`on_error` applies there), and then
read by index like the other in-memory annotations.
"""

from __future__ import annotations

import random

from mmgem.data.formats import IndexedSource, RawSample
from mmgem.data.records import ImageRecord


class RecordListSource(IndexedSource):
    """Already validated :class:`ImageRecord`s."""

    def __init__(self, name: str, records: list[ImageRecord], shuffle: bool = True) -> None:
        self.name = name
        self.records = records
        self.shuffle = shuffle

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int, rng: random.Random) -> RawSample:
        record = self.records[index]
        raw = {
            "image": record.image if record.image is not None else record.image_path,
            "caption": record.caption,
            "regions": [{"box": list(r.box), "caption": r.caption} for r in record.regions],
        }
        if record.long_caption:
            raw["long_caption"] = record.long_caption
        return RawSample(f"{self.name} line {record.line_number}", raw)
