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

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgem.data.formats import (
    IndexedSource,
    RawSample,
    SourceOptions,
    largest_region_caption,
    read_json,
    xywh_to_xyxy,
)
from mmgem.data.formats.hf import ArrowSource, RowConverter
from mmgem.data.paths import resolve_in_root


@dataclass
class Reference:
    """One referring expression: its image, box `[x0, y0, x1, y1]` in pixels and sentences."""

    image: Any  # a path string, or image bytes / a PIL image (parquet layout)
    box: list[float] | None
    sentences: list[str]
    ref_id: Any = None
    image_key: Any = None  # groups the references of one image
    problem: str | None = None  # why the reference is unusable (its sample is then a bad record)


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a refer pickle holds only lists, dicts, strings and numbers"
        )


def load_refer_pickle(path: str | Path) -> list[dict[str, Any]]:
    """The refs list of a refer-API pickle, loaded without running code (Python 2 strings decoded as UTF-8)."""
    with open(path, "rb") as handle:
        try:
            refs = _PlainUnpickler(handle, encoding="utf-8", errors="replace").load()
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            RecursionError,
        ) as error:
            raise ValueError(f"{path}: not a readable refer pickle ({type(error).__name__}: {error}).") from None
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a pickled list of refs, got a {type(refs).__name__}.")
    return refs


def find_instances(refs_path: Path) -> Path:
    """The `instances.json` beside a refs pickle."""
    path = refs_path.parent / "instances.json"
    if not path.is_file():
        raise ValueError(f"{refs_path}: no instances.json beside it (the refer API reads boxes from it).")
    return path


def _key(value: Any) -> Any:
    """An id usable as a dict key (int or str), else None."""
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def _sentences(value: Any) -> list[Any]:
    """The raw texts of a refer `sentences` list (anything else: none)."""
    if not isinstance(value, list):
        return []
    return [s.get("raw") or s.get("sent") for s in value if isinstance(s, dict)]


def refer_references(
    refs_path: str | Path, image_root: Path, split: str | None, allow_outside: bool = False
) -> list[Reference]:
    """References of `split` (all when None) from a refs pickle and its instances.json. An entry of the wrong type,
    or whose image leaves the data root, is a reference with a `problem` (reported when its sample is read)."""

    refs_path = Path(refs_path)
    refs = load_refer_pickle(refs_path)
    instances_path = find_instances(refs_path)
    instances = read_json(str(instances_path))
    if not isinstance(instances, dict):
        raise ValueError(f"{instances_path}: expected a COCO instances JSON object with 'images' and 'annotations'.")
    annotations, images = instances.get("annotations"), instances.get("images")
    annotations = annotations if isinstance(annotations, list) else []
    images = images if isinstance(images, list) else []
    boxes = {_key(a.get("id")): a.get("bbox") for a in annotations if isinstance(a, dict)}
    files = {_key(i.get("id")): i.get("file_name") for i in images if isinstance(i, dict)}
    references = []
    for number, ref in enumerate(refs):
        if not isinstance(ref, dict):
            problem = f"refs[{number}] is a {type(ref).__name__} (expected a dict)"
            references.append(Reference(None, None, [], f"refs[{number}]", ("refs", number), problem))
            continue
        if split is not None and ref.get("split") != split:
            continue
        image_key, ref_id = _key(ref.get("image_id")), _key(ref.get("ref_id"))
        if image_key is None or image_key not in files:
            problem = f"ref {ref_id}: image_id {str(ref.get('image_id'))[:80]!r} is not an image of instances.json"
            references.append(Reference(None, None, [], ref_id, ("refs", number), problem))
            continue
        path, problem = resolve_in_root(image_root, files[image_key], allow_outside=allow_outside, what='"file_name"')
        box = xywh_to_xyxy(boxes.get(_key(ref.get("ann_id"))) or [])
        sentences = _sentences(ref.get("sentences"))
        references.append(Reference(str(path) if path else None, box, sentences, ref_id, image_key, problem))
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
        root = options.data_root(refs_path.resolve().parent)
        references = refer_references(refs_path, root, options.split or "train", options.allow_outside_data_root)
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
        key = f"{self.name} image {str(references[0].image_key)[:80]}"
        problem = next((r.problem for r in references if r.problem), None)
        if problem:
            return RawSample(key, None, problem)
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
        answers = [answers] if isinstance(answers, str) else _strings(answers)
        if not answers:
            return RawSample(key, None, f"no expression in column {self.caption_column!r}")
        text = random.choice(answers)
        return RawSample(key, {"image": image, "caption": text, "regions": [{"box": box, "caption": text}]})


def _strings(value: Any) -> list[str]:
    """The strings of a list column value (anything else: none)."""
    return [a for a in value if isinstance(a, str)] if isinstance(value, list | tuple) else []


def parquet_references(path: str, options: SourceOptions) -> list[Reference]:
    """Every row of a RefCOCO parquet layout as a :class:`Reference` (for evaluation)."""
    source = ArrowSource(path, options, RefcocoRowConverter)
    convert = source.convert
    references = []
    for index in range(len(source)):
        row = source.dataset[index]
        image, _ = convert._image(row.get(convert.image_column))
        answers = row.get(convert.caption_column)
        answers = [answers] if isinstance(answers, str) else _strings(answers)
        key = row.get("file_name") or (image if isinstance(image, str) else None) or index
        references.append(Reference(image, xywh_to_xyxy(row.get("bbox") or []), answers, index, key))
    return references
