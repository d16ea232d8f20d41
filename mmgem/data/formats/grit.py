"""GRIT-style grounded captions: `noun_chunks` (and `ref_exps`) of `[char_start, char_end, x0, y0, x1, y1, score]`.

The character span `caption[char_start:char_end]` is the region's phrase; `x0, y0, x1, y1` are the box corners
normalised to [0, 1] by the image's width and height (xyxy). GRIT ships as img2dataset webdataset shards whose
`.json` holds `caption`, `noun_chunks`, `ref_exps`, `width` and `height` (`mmgem.data.formats.shards` reads them);
the same fields as columns of a parquet/JSON table are read by the `hf` format with `--regions-column noun_chunks`.
Boxes become pixels once the image is decoded (its actual size, which img2dataset may have resized).
"""

from __future__ import annotations

from typing import Any

from mmgem.data.formats import is_number

GRIT_FIELDS = "[char_start, char_end, x0, y0, x1, y1, score] with normalised xyxy"


def grit_regions(caption: Any, metadata: dict[str, Any], key: str = "noun_chunks") -> tuple[list[dict], str | None]:
    """Regions `{"box_normalized", "caption"}` of a GRIT record, or [] and the problem."""
    chunks = metadata.get(key)
    if chunks is None:
        return [], None
    if not isinstance(caption, str):
        return [], f'"{key}" needs the caption its character spans point into (got {caption!r})'
    if not isinstance(chunks, list):
        return [], f'"{key}" is a {type(chunks).__name__} (expected a list of {GRIT_FIELDS})'
    regions = []
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, list | tuple) or len(chunk) < 6:
            return [], f'"{key}"[{index}] = {chunk!r} is not {GRIT_FIELDS}'
        start, end = chunk[0], chunk[1]
        if not (is_number(start) and is_number(end) and 0 <= start < end <= len(caption)):
            return [], f'"{key}"[{index}] character span {start}:{end} is outside the {len(caption)}-character caption'
        if not all(is_number(v) for v in chunk[2:6]):
            return [], f'"{key}"[{index}] box {list(chunk[2:6])!r} is not 4 numbers ({GRIT_FIELDS})'
        phrase = caption[int(start) : int(end)].strip()
        regions.append({"box_normalized": [float(v) for v in chunk[2:6]], "caption": phrase})
    return regions, None
