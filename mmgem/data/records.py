"""Reading image-caption(-region) data for training and evaluation.

Two sources give the same :class:`ImageRecord` list:

- :func:`load_jsonl_records`: the project's JSON Lines format (written by `mmgem.synthetic`), one record a
  line: `{"image": path relative to the .jsonl file, "caption": str, "long_caption": str (optional),
  "regions": [{"box": [x0, y0, x1, y1], "caption": str}, ...] (optional), ...}`; other keys are kept in
  `ImageRecord.metadata`.
- :func:`load_imagefolder_records`: a `datasets` imagefolder (images plus a `metadata.jsonl` with `file_name`,
  `caption` and the same optional columns), loaded offline; records hold the image files' paths.

Boxes are pixel coordinates of the original image, `0 <= x0 < x1 <= width` and `0 <= y0 < y1 <= height` (right and
bottom edges exclusive, as `PIL.Image.getbbox`). Every record is validated; a problem names the file, the line (or
metadata row) and what was expected. With `on_error="skip"` a record with any problem is dropped whole, a bad
region included: keeping the rest of a half-broken annotation would silently change which regions an image has,
and a bad box usually means a wrong coordinate convention for the whole record.

:class:`ImageCaptionDataset` turns records into the items the training collator consumes.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch.utils.data import Dataset

from mmgem.data.paths import is_inside, opt_in_hint, outside_problem, resolve_in_root
from mmgem.data.safe_json import JSONProblem, parse_json
from mmgem.optional import require
from modeling_mmgem.image_loading_mmgem import INPUT_LIMITS, box_problem, input_limit, load_rgb_image, too_many_boxes

OnError = Literal["fail", "skip"]
MAX_REPORTED_PROBLEMS = 3  # problems listed in an error or warning (the count says how many there are)
MAX_PROBLEM_CHARS = 400  # one listed problem at most (see `shorten`)
_RECORD_KEYS = ("image", "file_name", "caption", "long_caption", "regions")
_BOX_RULE = "0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height"


@dataclass
class RegionRecord:
    """A box `[x0, y0, x1, y1]` in pixels of the original image (right/bottom exclusive) and its caption."""

    box: list[float]
    caption: str


@dataclass
class ImageRecord:
    """One image with its caption, optional long caption and regions.

    The image is either a file (`image_path`) or an in-memory PIL image (`image`); a PIL image passed as
    `image_path` is moved to `image`. `line_number` is the 1-based line of the .jsonl file (or the metadata row of an
    imagefolder) the record came from; `metadata` keeps the record's other fields (e.g. the synthetic "objects").
    """

    image_path: str | None
    caption: str
    long_caption: str | None = None
    regions: list[RegionRecord] = field(default_factory=list)
    line_number: int | None = None
    image: Image.Image | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.image_path, Image.Image):
            self.image, self.image_path = self.image_path, None
        elif isinstance(self.image_path, os.PathLike):
            self.image_path = os.fspath(self.image_path)
        if self.image_path is None and self.image is None:
            raise ValueError("An ImageRecord needs an image_path or an image.")

    def load_image(self) -> Image.Image:
        """The image as an RGB PIL image (a fresh copy: callers may modify it), loaded as the processor loads
        images (transparency composited onto white)."""
        return load_rgb_image(self.image if self.image is not None else self.image_path)


# ---------------------------------------------------------------------------------------------------------------------
# Validation shared by both sources


def _text_problem(record: dict[str, Any], key: str, required: bool) -> str | None:
    """Why `record[key]` is not a usable text, or None when it is (or is absent and optional)."""
    value = record.get(key)
    if value is None:
        return f'missing "{key}" (expected a non-empty string)' if required else None
    if not isinstance(value, str):
        return f'"{key}" is a {type(value).__name__} (expected a non-empty string)'
    if not value.strip():
        return f'empty "{key}" (expected a non-empty string)'
    return None


def _box_problem(box: Any, image_size: tuple[int, int] | None) -> str | None:
    """Why `box` is not a valid box inside an image of `image_size` (None: size unknown), or None."""
    width, height = image_size if image_size is not None else (None, None)
    if isinstance(box, list | tuple) and len(box) == 4:
        problem = box_problem(list(box), width, height, f"{width}x{height} image")
        box = list(box)
    else:
        problem = "is not 4 numbers"
    if problem is None:
        return None
    hints = {"is not 4 numbers": "[x0, y0, x1, y1] in pixels", "has zero or negative area": "x0 < x1 and y0 < y1"}
    return f"box {box!r} {problem} (expected {hints.get(problem, _BOX_RULE)})"


def _region_problems(regions: Any, image_size: tuple[int, int] | None) -> list[str]:
    """Problems of a record's "regions" value (absent or null means no regions)."""
    if regions is None:
        return []
    if not isinstance(regions, list):
        return [f'"regions" is a {type(regions).__name__} (expected a list of {{"box", "caption"}} objects)']
    problems = [f'"regions" {too_many_boxes(len(regions))}'] if too_many_boxes(len(regions)) else []
    for index, region in enumerate(regions):
        if not isinstance(region, dict):
            problems.append(f'region {index} is a {type(region).__name__} (expected {{"box": [...], "caption": str}})')
            continue
        box_problem = _box_problem(region.get("box"), image_size)
        if box_problem:
            problems.append(f"region {index}: {box_problem}")
        caption_problem = _text_problem(region, "caption", required=True)
        if caption_problem:
            problems.append(f"region {index}: {caption_problem}")
    return problems


def _build_record(
    raw: dict[str, Any],
    image: str | Image.Image | None,
    image_size: tuple[int, int] | None,
    line_number: int,
    extra_problems: Sequence[str] = (),
) -> tuple[ImageRecord | None, list[str]]:
    """Validate a raw record whose image is already resolved (None: unusable, see `extra_problems`).

    Returns the record and no problems, or None and every problem found.
    """
    problems = list(extra_problems)
    for key, required in (("caption", True), ("long_caption", False)):
        problem = _text_problem(raw, key, required)
        if problem:
            problems.append(problem)
    problems += _region_problems(raw.get("regions"), image_size)
    if problems:
        return None, problems
    regions = [RegionRecord(box=list(r["box"]), caption=r["caption"]) for r in raw.get("regions") or []]
    metadata = {k: v for k, v in raw.items() if k not in _RECORD_KEYS}
    record = ImageRecord(
        image_path=image if isinstance(image, str) else None,
        caption=raw["caption"],
        long_caption=raw.get("long_caption"),
        regions=regions,
        line_number=line_number,
        image=image if isinstance(image, Image.Image) else None,
        metadata=metadata,
    )
    return record, []


def _apply_policy(
    source: str,
    total: int,
    records: list[ImageRecord],
    problems: list[str],
    bad: int,
    on_error: OnError,
    max_reported: int,
) -> list[ImageRecord]:
    """Raise (fail) or warn (skip) about the collected problems; return the good records."""
    if not problems:
        return records
    listed = [shorten(p) for p in problems[:max_reported]]
    more = len(problems) - len(listed)
    details = "\n".join(f"  - {p}" for p in listed) + (f"\n  ... and {more} more" if more else "")
    hint = opt_in_hint(problems)
    if on_error == "fail":
        raise ValueError(
            f"{source}: {bad} of {total} records are invalid ({len(problems)} problems){hint}; the first:\n{details}"
        )
    warnings.warn(
        f"{source}: skipped {bad} of {total} records with problems (a bad region drops its whole record){hint}; "
        f"the first:\n{details}",
        stacklevel=3,
    )
    return records


def shorten(problem: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    """`problem` cut in the middle to at most `limit` characters (its start names the record, its end what was
    expected; a hostile value in between must not make a message huge)."""
    if len(problem) <= limit:
        return problem
    half = (limit - 5) // 2
    return f"{problem[:half]} ... {problem[-half:]}"


def _check_policy(on_error: str) -> None:
    if on_error not in ("fail", "skip"):
        raise ValueError(f'on_error must be "fail" or "skip", got {on_error!r}.')


# ---------------------------------------------------------------------------------------------------------------------
# JSON Lines


def _image_file(
    value: Any, base: Path, allow_outside: bool = False
) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """Resolve, confine and fully decode a record's "image": (absolute path, (width, height), problem).

    The image is decoded here, as training will (the loader's size limits included), so that a truncated file or a
    decompression bomb is reported with its line now instead of stopping training at its first batch. A path
    outside `base` (absolute, `../`, or a symlink leading out) is refused unless `allow_outside` (the data-root
    rule of `mmgem.data.paths`).
    """
    path, problem = resolve_in_root(base, value, allow_outside=allow_outside, what='"image"')
    if path is None:
        return None, None, problem
    if not path.is_file():
        return None, None, f"image file not found: {path} (expected an existing image file)"
    try:
        size = _decoded_size(path)
    except ValueError as error:
        return None, None, f"cannot read image {path} ({error}; expected a PNG, JPEG or other PIL-readable image)"
    return str(path), size, None


# Sizes of the image files this process has decoded, by path, with what identifies the file's content (inode, size,
# modification time) and the input limits they were checked under: loading the same records again (a second training
# stage, evaluation) does not decode every image again. Bounded: beyond it, images are decoded each time.
_DECODED_SIZES: dict[str, tuple[tuple[Any, ...], tuple[int, int]]] = {}
_MAX_DECODED_SIZES = 1_000_000


def _decoded_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image file at `path`, decoded completely once per unchanged file."""
    stat = path.stat()
    identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns, tuple(input_limit(name) for name in INPUT_LIMITS))
    known = _DECODED_SIZES.get(str(path))
    if known is not None and known[0] == identity:
        return known[1]
    size = load_rgb_image(str(path)).size
    if len(_DECODED_SIZES) < _MAX_DECODED_SIZES:
        _DECODED_SIZES[str(path)] = (identity, size)
    return size


def _parse_line(text: bytes | str) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object from one line, or None and the problem (malformed, not UTF-8, too deep, a huge integer)."""
    try:
        raw = parse_json(text)
    except JSONProblem as error:
        return None, f"{error} (expected one JSON object per line)"
    if not isinstance(raw, dict):
        return None, f"a JSON {type(raw).__name__} (expected a JSON object)"
    return raw, None


def load_jsonl_records(
    path: str | os.PathLike[str],
    on_error: OnError = "fail",
    max_reported: int = MAX_REPORTED_PROBLEMS,
    allow_outside_data_root: bool = False,
) -> list[ImageRecord]:
    """Read and validate a JSON Lines file of image records (format in the module docstring).

    Blank lines are ignored. Checked per record: valid JSON object; "image" names an image file inside the
    .jsonl file's folder (paths are relative to it) that decodes completely within the image size limits;
    "caption" a non-empty string; "long_caption", if present, a non-empty string; "regions", if present, a list
    (at most MMGEM_MAX_BOXES_PER_IMAGE long) of {"box": 4 numbers with positive area inside the image,
    "caption": non-empty string}.

    Args:
        path: the .jsonl file.
        on_error: "fail" raises a ValueError listing the problems (file, line and what was expected, the first
            `max_reported` of them); "skip" drops every record with a problem, a bad region dropping its whole
            record, and warns with the count and the first problems.
        max_reported: how many problems the error or warning lists.
        allow_outside_data_root: accept images outside the .jsonl file's folder (absolute or `../` paths).

    Returns:
        The valid records, in file order, with absolute `image_path`s and 1-based `line_number`s.
    """
    _check_policy(on_error)
    path = Path(path)
    base = path.resolve().parent
    records: list[ImageRecord] = []
    problems: list[str] = []
    total = bad = 0
    with open(path, "rb") as handle:  # bytes: a line that is not UTF-8 is one bad record, not a crash
        for line_number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            total += 1
            record, record_problems = _jsonl_record(text, base, line_number, allow_outside_data_root)
            if record is not None:
                records.append(record)
            else:
                bad += 1
                problems += [f"{path.name} line {line_number}: {p}" for p in record_problems]
    return _apply_policy(str(path), total, records, problems, bad, on_error, max_reported)


def _jsonl_record(
    text: bytes | str, base: Path, line_number: int, allow_outside: bool = False
) -> tuple[ImageRecord | None, list[str]]:
    raw, problem = _parse_line(text)
    if raw is None:
        return None, [problem]
    image_path, size, image_problem = _image_file(raw.get("image"), base, allow_outside)
    extra = [image_problem] if image_problem else []
    return _build_record(raw, image_path, size, line_number, extra)


# ---------------------------------------------------------------------------------------------------------------------
# datasets imagefolder


METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def load_imagefolder_records(
    folder: str | os.PathLike[str],
    split: str = "train",
    on_error: OnError = "fail",
    cache_dir: str | os.PathLike[str] | None = None,
    max_reported: int = MAX_REPORTED_PROBLEMS,
    allow_outside_data_root: bool = False,
) -> list[ImageRecord]:
    """Read an imagefolder dataset (images plus `metadata.jsonl`) with `datasets`, offline, as records.

    The metadata has one row per image: `file_name` (relative to the metadata file), `caption`, and optionally
    `long_caption` and `regions` (as in the JSON Lines format); other columns go to `ImageRecord.metadata`.
    Each image is decoded once to validate it and then dropped: records hold the file's path (`image_path`), so
    memory does not grow with the number of images. Validation and `on_error` work as in
    :func:`load_jsonl_records`; problems name the metadata row (1-based, in split order) and its file name. Image
    files must lie inside `folder` (the data-root rule of `mmgem.data.paths`) unless `allow_outside_data_root`.

    Args:
        folder: the imagefolder root (`datasets.load_dataset("imagefolder", data_dir=folder)`).
        split: the split to read ("train" unless the folder has split subfolders).
        on_error: "fail" or "skip", see :func:`load_jsonl_records`.
        cache_dir: the `datasets` cache folder (default: the usual Hugging Face cache); not inside `folder`.
        max_reported: how many problems the error or warning lists.
        allow_outside_data_root: accept image files outside `folder` (reached through symbolic links).
    """
    # Deferred: importing `datasets` is slow, only this loader needs it, and it is the extra `data`.
    datasets = require("datasets", "data", "Reading an imagefolder")

    _check_policy(on_error)
    if cache_dir is not None and Path(folder).resolve() in Path(cache_dir).resolve().parents:
        # The builder would read its own cache files back as data on the next load.
        raise ValueError(f"cache_dir {cache_dir} is inside the data folder {folder}; put it elsewhere.")
    if not any(any(Path(folder).rglob(name)) for name in METADATA_FILES):
        raise ValueError(
            f'{folder}: no metadata.jsonl in this image folder (expected one JSON line per image with "file_name" '
            'and "caption"; see mmgem.data.records.export_imagefolder).'
        )
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=os.fspath(folder), split=split, cache_dir=None if cache_dir is None else str(cache_dir)
    )
    if "caption" not in dataset.column_names:
        raise ValueError(f"{folder}: the metadata has no 'caption' column (columns: {dataset.column_names}).")
    # Undecoded, to name each row's file in reports and to report an unreadable image instead of crashing.
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    records: list[ImageRecord] = []
    problems: list[str] = []
    bad = 0
    for row_number, row in enumerate(dataset, start=1):
        value = row.pop("image")
        image, name, image_problem = _decode_image(value, folder, allow_outside_data_root)
        extra = [image_problem] if image_problem else []
        size = image.size if image is not None else None
        if image is not None and value.get("path") and Path(value["path"]).is_file():
            image.close()
            image = str(Path(value["path"]).resolve())  # the path, not the pixels: memory stays flat
        record, record_problems = _build_record(row, image, size, row_number, extra)
        if record is not None:
            records.append(record)
        else:
            bad += 1
            problems += [f"metadata row {row_number} ({name}): {p}" for p in record_problems]
    return _apply_policy(f"{folder} [{split}]", len(dataset), records, problems, bad, on_error, max_reported)


def _decode_image(
    value: dict[str, Any], folder: str | os.PathLike[str] | None = None, allow_outside: bool = False
) -> tuple[Image.Image | None, str, str | None]:
    """Decode an undecoded `datasets.Image` value: (loaded PIL image, file name, problem)."""
    path = value.get("path") or ""
    name = Path(path).name or "<bytes>"
    if path and folder is not None and not allow_outside and not value.get("bytes") and not is_inside(path, folder):
        return None, name, outside_problem(path, Path(folder).resolve())
    try:
        # Decoded now, within the loader's size limits: a truncated file or a decompression bomb is reported with
        # its row instead of stopping training.
        image = load_rgb_image(value["bytes"] if value.get("bytes") else path)
    except ValueError as error:
        return None, name, f"cannot read image {path} ({error}; expected a PIL-readable image)"
    return image, name, None


def export_imagefolder(records: Sequence[ImageRecord], folder: str | os.PathLike[str]) -> Path:
    """Write records as an imagefolder (images plus `metadata.jsonl`) that :func:`load_imagefolder_records` reads.

    Image files are copied (in-memory images saved as PNG) under `folder/images/`; metadata columns are
    `file_name`, `caption`, `long_caption` (when any record has one), `regions` and the records' metadata.
    Returns the metadata file's path.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with_long = any(r.long_caption for r in records)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            suffix = Path(record.image_path).suffix if record.image_path else ".png"
            file_name = f"images/{index:06d}{suffix}"
            if record.image_path:
                shutil.copyfile(record.image_path, folder / file_name)
            else:
                record.image.save(folder / file_name)
            row: dict[str, Any] = {"file_name": file_name, "caption": record.caption}
            if with_long:
                row["long_caption"] = record.long_caption
            row["regions"] = [{"box": list(r.box), "caption": r.caption} for r in record.regions]
            handle.write(json.dumps({**row, **record.metadata}) + "\n")
    return folder / "metadata.jsonl"


def load_records(
    data: str | os.PathLike[str], on_error: str = "fail", allow_outside_data_root: bool = False
) -> list[ImageRecord]:
    """Records of a .jsonl file or of an imagefolder (a folder with `metadata.jsonl`)."""
    path = Path(data)
    if path.is_dir():
        return load_imagefolder_records(path, on_error=on_error, allow_outside_data_root=allow_outside_data_root)
    return load_jsonl_records(path, on_error=on_error, allow_outside_data_root=allow_outside_data_root)


# ---------------------------------------------------------------------------------------------------------------------
# torch Dataset


class ImageCaptionDataset(Dataset):
    """Records as training items: `{"image": RGB PIL image, "caption": str, "regions": [{"box", "caption"}]}`.

    Args:
        records: the records (from either loader).
        use_long_caption: use each record's `long_caption` as "caption"; every record must have one (a silent
            fallback to the short caption would mix two tasks), else a ValueError names the first lines without.
        with_regions: include the regions; otherwise "regions" is an empty list.
        image_cache_bytes: keep the decoded pixels of images up to this many bytes in all (3 bytes a pixel), so that
            later epochs do not decode them again; 0 keeps none. Each process (and DataLoader worker) has its own.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        use_long_caption: bool = False,
        with_regions: bool = True,
        image_cache_bytes: int = 0,
    ):
        if isinstance(image_cache_bytes, bool) or not isinstance(image_cache_bytes, int) or image_cache_bytes < 0:
            raise ValueError(f"`image_cache_bytes` must be an int >= 0; got {image_cache_bytes!r}.")
        if use_long_caption:
            missing = [r.line_number for r in records if not r.long_caption]
            if missing:
                raise ValueError(
                    f"use_long_caption=True but {len(missing)} records have no long_caption (lines {missing[:10]})."
                )
        self.records = list(records)
        self.use_long_caption = use_long_caption
        self.with_regions = with_regions
        self.image_cache_bytes = image_cache_bytes
        self._pixels: dict[int, tuple[tuple[int, int], bytes]] = {}  # index -> (size, RGB bytes)
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, index: int) -> Image.Image:
        """Record `index`'s image: a fresh RGB image, from the cache of decoded pixels when it holds it."""
        cached = self._pixels.get(index)
        if cached is not None:
            return Image.frombytes("RGB", *cached)
        image = self.records[index].load_image()
        if self._cached_bytes + 3 * image.width * image.height <= self.image_cache_bytes:
            self._pixels[index] = (image.size, image.tobytes())
            self._cached_bytes += 3 * image.width * image.height
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        regions = record.regions if self.with_regions else []
        return {
            "image": self._image(index),
            "caption": record.long_caption if self.use_long_caption else record.caption,
            "regions": [{"box": list(r.box), "caption": r.caption} for r in regions],
        }
