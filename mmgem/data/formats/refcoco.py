"""RefCOCO / RefCOCO+ / RefCOCOg referring expressions, in either published layout.

- The refer API's files: `refs(umd).p` (or `refs(unc).p`, `refs(google).p`), a pickled list of `{"ref_id",
  "ann_id", "image_id", "split", "sentences": [{"raw", "sent", ...}], ...}`, beside `instances.json` (COCO
  instances: `images[].file_name`, `annotations[].bbox` = `[x, y, width, height]` in pixels). Images are the COCO
  train2014 files under `--image-root`. The pickle is read with an unpickler that builds only plain containers,
  strings and numbers: a data file cannot run code.
- The parquet layout (Hugging Face copies such as RefCOCOg's): one row per expression, columns `image`, `bbox`
  (`[x, y, width, height]` pixels) and `answer` (the list of expressions), optionally `file_name`.

Training takes `--data-split` (default "train") and yields one sample per image with one region per expression
(one of its sentences drawn per epoch); region-only data has no image caption, so the largest region's text
serves as one.
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgem.data.formats import IndexedSource, RawSample, SourceOptions, largest_region_caption, xywh_to_xyxy
from mmgem.data.formats.hf import ArrowSource, RowConverter


@dataclass
class Reference:
    """One referring expression: its image, box `[x0, y0, x1, y1]` in pixels and sentences."""

    image: Any  # a path string, or image bytes / a PIL image (parquet layout)
    box: list[float] | None
    sentences: list[str]
    ref_id: Any = None
    image_key: Any = None  # groups the references of one image


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a refer pickle holds only lists, dicts, strings and numbers"
        )


def load_refer_pickle(path: str | Path) -> list[dict[str, Any]]:
    """The refs list of a refer-API pickle, loaded without running code (Python 2 strings decoded as UTF-8)."""
    with open(path, "rb") as handle:
        refs = _PlainUnpickler(handle, encoding="utf-8", errors="replace").load()
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a pickled list of refs, got a {type(refs).__name__}.")
    return refs


def find_instances(refs_path: Path) -> Path:
    """The `instances.json` beside a refs pickle."""
    path = refs_path.parent / "instances.json"
    if not path.is_file():
        raise ValueError(f"{refs_path}: no instances.json beside it (the refer API reads boxes from it).")
    return path


def refer_references(refs_path: str | Path, image_root: Path, split: str | None) -> list[Reference]:
    """References of `split` (all when None) from a refs pickle and its instances.json."""

    refs_path = Path(refs_path)
    refs = load_refer_pickle(refs_path)
    instances = json.loads(find_instances(refs_path).read_text(encoding="utf-8"))
    boxes = {a["id"]: a.get("bbox") for a in instances.get("annotations", [])}
    files = {i["id"]: i.get("file_name") for i in instances.get("images", [])}
    references = []
    for ref in refs:
        if split is not None and ref.get("split") != split:
            continue
        file_name = files.get(ref.get("image_id"))
        path = str(image_root / file_name) if file_name else None
        box = xywh_to_xyxy(boxes.get(ref.get("ann_id")) or [])
        sentences = [s.get("raw") or s.get("sent") for s in ref.get("sentences") or [] if isinstance(s, dict)]
        references.append(Reference(path, box, sentences, ref.get("ref_id"), ref.get("image_id")))
    return references


def find_refs_pickle(folder: Path) -> Path | None:
    """`refs(umd).p` first (RefCOCOg's standard split), else any `refs(*).p` in `folder`."""
    preferred = folder / "refs(umd).p"
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("refs(*).p"))
    return found[0] if found else None


class RefcocoSource(IndexedSource):
    """One sample per image: one region per referring expression."""

    def __init__(self, path: str, options: SourceOptions) -> None:
        self.name = f"refcoco:{path}"
        refs_path = Path(path)
        if refs_path.is_dir():
            found = find_refs_pickle(refs_path)
            if found is None:
                raise ValueError(f"{path}: no refs(*).p file in the folder.")
            refs_path = found
        root = Path(options.image_root) if options.image_root else refs_path.parent
        references = refer_references(refs_path, root, options.split or "train")
        if not references:
            raise ValueError(f"{self.name}: no reference of split {options.split or 'train'!r}.")
        by_image: dict[Any, list[Reference]] = {}
        for reference in references:
            by_image.setdefault(reference.image_key, []).append(reference)
        self.images = list(by_image.values())
        self.shuffle = options.shuffle

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, index: int, rng: random.Random) -> RawSample:
        references = self.images[index]
        key = f"{self.name} image {references[0].image_key}"
        path = references[0].image
        if path is None or not Path(path).is_file():
            return RawSample(key, None, f"image file not found: {path}")
        regions = []
        for reference in references:
            if reference.box is None:
                return RawSample(key, None, f"ref {reference.ref_id}: its annotation has no [x, y, w, h] bbox")
            if not reference.sentences:
                return RawSample(key, None, f"ref {reference.ref_id}: no sentence")
            regions.append({"box": reference.box, "caption": rng.choice(reference.sentences)})
        return RawSample(key, {"image": path, "caption": largest_region_caption(regions), "regions": regions})


class RefcocoRowConverter(RowConverter):
    """A parquet row (`image`, `bbox` xywh, `answer` list) -> a raw sample with one region."""

    def __init__(self, options: SourceOptions, root: Path | None) -> None:
        super().__init__(options, root)
        self.caption_column = options.caption_column or "answer"
        self.regions_column = None

    def check_columns(self, columns: list[str], name: str) -> None:
        super().check_columns(columns, name)
        if "bbox" not in columns:
            raise ValueError(f"{name}: the RefCOCO parquet layout needs a 'bbox' column (columns: {columns}).")

    def __call__(self, row: dict[str, Any], key: str) -> RawSample:
        image, problem = self._image(row.get(self.image_column))
        if problem:
            return RawSample(key, None, problem)
        box = xywh_to_xyxy(row.get("bbox") or [])
        if box is None:
            return RawSample(key, None, f"bbox {row.get('bbox')!r} is not [x, y, width, height]")
        answers = row.get(self.caption_column)
        answers = [answers] if isinstance(answers, str) else [a for a in answers or [] if isinstance(a, str)]
        if not answers:
            return RawSample(key, None, f"no expression in column {self.caption_column!r}")
        text = random.choice(answers)
        return RawSample(key, {"image": image, "caption": text, "regions": [{"box": box, "caption": text}]})


def parquet_references(path: str, options: SourceOptions) -> list[Reference]:
    """Every row of a RefCOCO parquet layout as a :class:`Reference` (for evaluation)."""
    source = ArrowSource(path, options, RefcocoRowConverter)
    convert = source.convert
    references = []
    for index in range(len(source)):
        row = source.dataset[index]
        image, _ = convert._image(row.get(convert.image_column))
        answers = row.get(convert.caption_column)
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        key = row.get("file_name") or (image if isinstance(image, str) else None) or index
        references.append(Reference(image, xywh_to_xyxy(row.get("bbox") or []), answers, index, key))
    return references
