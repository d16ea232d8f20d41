"""Readers for the published layouts of image-text and region data, one module per family.

Every reader is a :class:`Source` that yields :class:`RawSample`s: a key naming the sample in messages and either
a raw record or the problem that made it unusable. A raw record is a dict with

- `"image"`: a file path, encoded image bytes or a PIL image (decoded later, in the DataLoader worker);
- `"caption"` (a string) or `"captions"` (several references, one is drawn per epoch);
- optionally `"long_caption"`, and `"regions"`: `[{"box": [x0, y0, x1, y1] in pixels, "caption": str}]` or, for
  formats that store normalised boxes, `[{"box_normalized": [x0, y0, x1, y1] in [0, 1], "caption": str}]`.

`mmgem.data.sources` decodes, converts and validates them with the checks of `mmgem.data.records`, so every format
follows `--data-on-error` the same way. A source reads only its share of the data: :class:`Shard` is this
process's place among all ranks times DataLoader workers.

Formats (`--data-format` names): `webdataset` (and `grit` shards), `hf` (datasets folders, parquet/arrow files,
Hub repos), `llava` (LLaVA / ShareGPT4V conversations), `coco` (COCO captions), `karpathy`, `visual-genome`,
`refcoco` (refer pickle + instances.json, or the parquet layout), `jsonl` and `imagefolder` (the project's own).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmgem.data.paths import resolve_in_root
from mmgem.data.safe_json import read_json_file

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Shard:
    """This reader's share: `index` of `count` readers (ranks x DataLoader workers), rank-major."""

    index: int = 0
    count: int = 1


@dataclass
class RawSample:
    """One sample as read: `key` names it in messages; `raw` is the record, or None and `problem` says why."""

    key: str
    raw: dict[str, Any] | None
    problem: str | None = None


@dataclass
class SourceOptions:
    """What a reader may need besides its path (command line: `--image-root`, `--image-column`, ...)."""

    image_root: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    regions_column: str | None = None
    split: str | None = None
    resampled: bool = False
    shuffle: bool = True
    shuffle_buffer: int = 1000
    allow_outside_data_root: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def data_root(self, default: Path) -> Path:
        """The folder the format's image paths are relative to: `--image-root`, else `default` (the annotation
        file's folder). Paths must stay inside it (`mmgem.data.paths`)."""
        return Path(self.image_root) if self.image_root else Path(default)


class Source:
    """A readable data source. Subclasses implement :meth:`samples`; `name` appears in every message."""

    name: str = "source"

    def samples(self, shard: Shard, epoch: int, seed: int) -> Iterator[RawSample]:
        """This shard's samples for one pass over the data (shuffled by `seed` and `epoch` when enabled)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class IndexedSource(Source):
    """A source whose annotations are in memory (a JSON file): index `i` of a permutation shared by all shards.

    Only the annotations are held (no image is decoded before a worker needs it). The permutation depends on
    `seed` and `epoch` only, so the shards of one epoch are disjoint and together cover every entry once.
    """

    shuffle: bool = True

    def __len__(self) -> int:
        raise NotImplementedError

    def sample(self, index: int, rng: random.Random) -> RawSample:
        raise NotImplementedError

    def samples(self, shard: Shard, epoch: int, seed: int) -> Iterator[RawSample]:
        order = list(range(len(self)))
        if self.shuffle:
            random.Random(f"{seed}-{epoch}").shuffle(order)
        rng = random.Random(f"{seed}-{epoch}-{shard.index}")
        for index in order[shard.index :: shard.count]:
            yield self.sample(index, rng)


@functools.lru_cache(maxsize=8)
def read_json(path: str) -> Any:
    """A JSON file's content (cached: detection and the reader parse each annotation file once), decoded by
    `mmgem.data.safe_json` (depth and integer limits, UTF-8 checked): a problem is a ValueError naming the file."""
    return read_json_file(path)


def resolve_image(
    root: Path, relative: Any, allow_outside: bool = False, what: str = "image"
) -> tuple[str | None, str | None]:
    """`root / relative` as a path string under the data-root rule (`mmgem.data.paths`), or None and the problem.
    The file must exist; it is decoded later."""
    path, problem = resolve_in_root(root, relative, allow_outside=allow_outside, what=what)
    if path is None:
        return None, problem
    if not path.is_file():
        return None, f"image file not found: {path}"
    return str(path), None


def type_problem(value: Any, expected: type | tuple[type, ...], what: str) -> str | None:
    """Say "<what> is a <type> (expected a <expected>)" when `value` is not of `expected`, else None."""
    if isinstance(value, expected):
        return None
    names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
    return f"{what} is a {type(value).__name__} (expected a {names})"


def is_number(value: Any) -> bool:
    """A finite-or-not real number, bool excluded (JSON `true` is not a coordinate)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def xywh_to_xyxy(box: Sequence[float]) -> list[float] | None:
    """`[x, y, width, height]` -> `[x0, y0, x1, y1]` (pixels, right/bottom exclusive); None if not 4 numbers."""
    if not isinstance(box, list | tuple) or len(box) != 4 or not all(is_number(v) for v in box):
        return None
    x, y, width, height = (float(v) for v in box)
    return [x, y, x + width, y + height]


def largest_region_caption(regions: Sequence[dict[str, Any]]) -> str | None:
    """The caption of the largest box: the whole-image caption of region-only data (Visual Genome, RefCOCO)."""

    def area(region: dict[str, Any]) -> float:
        box = region["box"]
        return (box[2] - box[0]) * (box[3] - box[1])

    captioned = [
        r
        for r in regions
        if isinstance(r, dict)
        and isinstance(r.get("caption"), str)
        and isinstance(r.get("box"), list)
        and len(r["box"]) == 4
        and all(is_number(v) for v in r["box"])
    ]
    return max(captioned, key=area)["caption"] if captioned else None
