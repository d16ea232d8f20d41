"""Standard benchmarks from local copies in their published layouts: `mmgem evaluate --benchmark NAME --data-dir DIR`.

- `coco`: retrieval on the Karpathy 5k test; `dataset_coco.json`, `val2014/`; image->text and text->image R@1/5/10.
- `flickr30k`: the same on the Karpathy 1k test; `dataset_flickr30k.json`, `flickr30k-images/`.
- `imagenet`: zero-shot top-1/top-5; `val/<wnid>/*.JPEG` (or the 1,000 class folders at the top), OpenAI's class
  names and 80 templates by default. `imagefolder`: any `<class name>/*` folders ("a photo of a {}.").
- Long-text retrieval, R@1 both ways: `urban1k` (`image/<n>.jpg` + `caption/<n>.txt`), `docci`
  (`docci_descriptions.jsonlines` + `images/`, split "test"), `dci` (`annotations/*.json` with `image`,
  `short_caption`, `extra_caption`, the text being both captions joined; images in `photos/`), `sharegpt4v-1k` (the
  first 1,000 entries of a ShareGPT4V conversation JSON, images relative to it).
- `coco-captions`: captioning on the Karpathy 5k test (layout of `coco`): BLEU-4, METEOR, CIDEr-D, SPICE.
- `refcocog`: region captioning (CIDEr, METEOR, BLEU-4) and region<->text R@1 on the umd "val" split:
  `refs(umd).p` + `instances.json` + `train2014/`, or parquet files with `image`, `bbox` (xywh), `answer`.

Retrieval follows the CLIP papers: every image has its 5 captions (Karpathy), an image->text query is right when
any of its captions is in the top k, a text->image query when its image is. Captions are scored with
`pycocoevalcap`: its PTB tokenizer (Java), BLEU, CIDEr-D and METEOR (Java, bundled jar); SPICE runs only when its
Stanford CoreNLP jars are already in pycocoevalcap's `spice/lib` (they are a download, never fetched here). The
metrics that ran are listed under `<benchmark>/caption_metrics`.

Region boxes and a processor with a center crop: an image is padded to a square (centered, with black) before the
processor sees it, boxes shifted alike, so that no box is cut away by the crop.

Each benchmark is a task of the evaluation engine (:mod:`mmgem.evaluation.tasks`), run with its
:class:`~mmgem.evaluation.tasks.EmbeddingCache`: tasks that share an image set embed it once, and with `--cache-dir`
across runs too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmgem.data.formats import SourceOptions
from mmgem.data.formats.coco import karpathy_images
from mmgem.data.formats.conversations import first_gpt_turn
from mmgem.data.formats.hf import table_files
from mmgem.data.formats.refcoco import find_refs_pickle, parquet_references, refer_references
from mmgem.evaluation.tasks import RECALL_KS, CaptioningTask, RegionTask, RetrievalTask, ZeroShotTask, content_identity
from mmgem.evaluation.templates import IMAGENET_CLASSES, IMAGENET_TEMPLATES

KARPATHY_CAPTIONS = 5
SHAREGPT4V_COUNT = 1000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_WNID = re.compile(r"^n\d{8}$")


# ---------------------------------------------------------------------------------------------------------- loaders
@dataclass
class BenchmarkOptions:
    """What a loader may need besides the folder."""

    split: str | None = None
    limit: int | None = None  # the first N images (or regions): a quick check, not a comparable number
    classes: str | None = None  # a file of class names (JSON list / {folder: name} / one per line)
    templates: str | None = None  # a file of prompt templates (JSON list / one per line)


def _find(folder: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        for candidate in (folder / name, folder / "annotations" / name, folder / "karpathy" / name):
            if candidate.is_file():
                return candidate
    raise ValueError(f"`--data-dir` {folder}: no {what} ({' or '.join(names)}) in it or in annotations/.")


def _check_images(name: str, paths: Sequence[Any]) -> None:
    missing = [p for p in paths if isinstance(p, str | Path) and not Path(p).is_file()]
    if missing:
        raise ValueError(f"{name}: {len(missing)} of {len(paths)} images are missing, e.g. {missing[0]}.")


def _limit(items: list, options: BenchmarkOptions) -> list:
    return items[: options.limit] if options.limit else items


def _karpathy(folder: Path, dataset: str, options: BenchmarkOptions):
    path = _find(folder, [f"dataset_{dataset}.json"], f"Karpathy split file for {dataset}")
    split = options.split or "test"
    images = _limit(karpathy_images(json.loads(path.read_text(encoding="utf-8")), folder, {split}, str(path)), options)
    if not images:
        raise ValueError(f"{path}: no image of split {split!r}.")
    unusable = [i for i in images if i.problem]
    if unusable:
        first = unusable[0]
        raise ValueError(f"{path}: {len(unusable)} entries are unusable, e.g. {first.label}: {first.problem}")
    _check_images(dataset, [i.path for i in images])
    return images


def load_retrieval_karpathy(name: str, folder: Path, options: BenchmarkOptions) -> RetrievalTask:
    dataset = "coco" if name == "coco" else "flickr30k"
    images = _karpathy(folder, dataset, options)
    texts, owners = [], []
    for index, image in enumerate(images):
        captions = image.captions[:KARPATHY_CAPTIONS]
        if not captions:
            raise ValueError(f"{name}: image {image.path.name} has no caption.")
        texts += captions
        owners += [index] * len(captions)
    return RetrievalTask(name, [str(i.path) for i in images], texts, owners)


def load_coco_captions(name: str, folder: Path, options: BenchmarkOptions) -> CaptioningTask:
    images = _karpathy(folder, "coco", options)
    return CaptioningTask(name, [str(i.path) for i in images], [i.captions for i in images])


def _read_list(path: str, what: str) -> Any:
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{what} file {path} is empty.") from None
        return lines


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_zero_shot(name: str, folder: Path, options: BenchmarkOptions) -> ZeroShotTask:
    root = (
        folder / (options.split or "val")
        if name == "imagenet" and (folder / (options.split or "val")).is_dir()
        else folder
    )
    folders = _class_folders(root)
    if not folders:
        raise ValueError(f"`--data-dir` {root}: no class folders.")
    if options.classes:
        given = _read_list(options.classes, "`--classes`")
        if isinstance(given, dict):
            unknown = [f.name for f in folders if f.name not in given]
            if unknown:
                raise ValueError(f"`--classes` {options.classes} names no class for folders {unknown[:5]}.")
            classes = [given[f.name] for f in folders]
        else:
            classes = list(given)
    elif name == "imagenet" and len(folders) == len(IMAGENET_CLASSES) and all(_WNID.match(f.name) for f in folders):
        classes = list(IMAGENET_CLASSES)  # sorted WordNet ids = class index order
    elif name == "imagenet":
        raise ValueError(
            f"imagenet: {root} has {len(folders)} class folders, expected the 1,000 WordNet-id folders (n01440764, "
            "...); pass `--classes` for another layout or use `--benchmark imagefolder`."
        )
    else:
        classes = [f.name.replace("_", " ") for f in folders]
    if len(classes) != len(folders):
        raise ValueError(f"`--classes` has {len(classes)} names for {len(folders)} class folders.")
    if options.templates:
        templates = list(_read_list(options.templates, "`--templates`"))
    else:
        templates = list(IMAGENET_TEMPLATES) if name == "imagenet" else ["a photo of a {}."]
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ValueError(f"`--templates` entries need exactly one '{{}}' for the class name; got {bad[0]!r}.")
    images, labels = [], []
    for label, class_folder in enumerate(folders):
        files = sorted(p for p in class_folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images += [str(p) for p in files]
        labels += [label] * len(files)
    if options.limit:  # every class, evenly: the first N images would all be of the first classes
        step = max(1, len(images) // options.limit)
        images, labels = images[::step][: options.limit], labels[::step][: options.limit]
    if not images:
        raise ValueError(f"`--data-dir` {root}: the class folders hold no image ({IMAGE_SUFFIXES}).")
    return ZeroShotTask(name, images, labels, classes, templates)


def _long_task(name: str, pairs: list[tuple[Any, str]], options: BenchmarkOptions) -> RetrievalTask:
    pairs = _limit(pairs, options)
    if not pairs:
        raise ValueError(f"{name}: no image-text pair found.")
    _check_images(name, [p for p, _ in pairs])
    return RetrievalTask(name, [p for p, _ in pairs], [t for _, t in pairs], list(range(len(pairs))), (1, 5, 10))


def load_urban1k(name: str, folder: Path, options: BenchmarkOptions) -> RetrievalTask:
    images = {p.stem: p for p in (folder / "image").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    captions = {p.stem: p for p in (folder / "caption").glob("*.txt")}
    if not images or set(images) != set(captions):
        raise ValueError(
            f"urban1k: expected `image/<name>.jpg` and `caption/<name>.txt` pairs in {folder}; "
            f"{len(images)} images, {len(captions)} captions, {len(set(images) ^ set(captions))} unmatched."
        )
    keys = sorted(images, key=lambda k: (len(k), k))
    return _long_task(name, [(str(images[k]), captions[k].read_text(encoding="utf-8").strip()) for k in keys], options)


def load_docci(name: str, folder: Path, options: BenchmarkOptions) -> RetrievalTask:
    path = _find(folder, ["docci_descriptions.jsonlines", "docci_descriptions.jsonl"], "DOCCI descriptions")
    split = options.split or "test"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("split") == split:
                pairs.append((str(folder / "images" / row["image_file"]), row["description"]))
    return _long_task(name, pairs, options)


def load_dci(name: str, folder: Path, options: BenchmarkOptions) -> RetrievalTask:
    annotations = folder / "annotations" if (folder / "annotations").is_dir() else folder
    photos = folder / "photos" if (folder / "photos").is_dir() else folder
    pairs = []
    for path in sorted(annotations.glob("*.json")):
        row = json.loads(path.read_text(encoding="utf-8"))
        text = " ".join(t.strip() for t in (row.get("short_caption"), row.get("extra_caption")) if t and t.strip())
        pairs.append((str(photos / row["image"]), text))
    return _long_task(name, pairs, options)


def load_sharegpt4v(name: str, folder: Path, options: BenchmarkOptions) -> RetrievalTask:
    files = sorted(folder.glob("*.json"), key=lambda p: ("share-captioner" not in p.name, p.name))
    if not files:
        raise ValueError(f"sharegpt4v-1k: no ShareGPT4V conversation JSON in {folder}.")
    entries = json.loads(files[0].read_text(encoding="utf-8"))[:SHAREGPT4V_COUNT]
    return _long_task(name, [(str(folder / e["image"]), first_gpt_turn(e)) for e in entries], options)


def load_refcocog(name: str, folder: Path, options: BenchmarkOptions) -> RegionTask:
    split = options.split or "val"
    refs = find_refs_pickle(folder)
    if refs is not None:
        root = next((folder / d for d in ("train2014", "images") if (folder / d).is_dir()), folder)
        references = refer_references(refs, root, split)
    else:
        files = [f for f in table_files(folder) if split in f.name] or table_files(folder)
        if not files:
            raise ValueError(f"refcocog: no refs(umd).p + instances.json nor parquet files in {folder}.")
        references = [r for f in files for r in parquet_references(str(f), SourceOptions(image_root=str(folder)))]
    references = _limit([r for r in references if r.box is not None and r.sentences and not r.problem], options)
    if not references:
        raise ValueError(f"refcocog: no reference of split {split!r} in {folder}.")
    _check_images(name, [r.image for r in references])
    order: dict[Any, int] = {}
    images: list[Any] = []
    boxes: list[list[list[float]]] = []
    grouped: list[list[list[str]]] = []
    for reference in references:
        key = reference.image_key if reference.image_key is not None else content_identity(reference.image)
        if key not in order:
            order[key] = len(images)
            images.append(reference.image)
            boxes.append([])
            grouped.append([])
        boxes[order[key]].append(reference.box)
        grouped[order[key]].append(reference.sentences)
    return RegionTask(name, images, boxes, [s for per_image in grouped for s in per_image])


BENCHMARKS: dict[str, Callable[[str, Path, BenchmarkOptions], Any]] = {
    "coco": load_retrieval_karpathy,
    "flickr30k": load_retrieval_karpathy,
    "imagenet": load_zero_shot,
    "imagefolder": load_zero_shot,
    "urban1k": load_urban1k,
    "docci": load_docci,
    "dci": load_dci,
    "sharegpt4v-1k": load_sharegpt4v,
    "coco-captions": load_coco_captions,
    "refcocog": load_refcocog,
}


def load_benchmark(name: str, data_dir: str | Path, options: BenchmarkOptions | None = None) -> Any:
    """The task of benchmark `name` read from `data_dir` (a ValueError names what is missing)."""
    if name not in BENCHMARKS:
        raise ValueError(f"`--benchmark` must be one of {sorted(BENCHMARKS)}; got {name!r}.")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ValueError(f"`--data-dir` {data_dir} is not a folder (benchmark {name}).")
    return BENCHMARKS[name](name, folder, options or BenchmarkOptions())


# ---------------------------------------------------------------------------------------------------------- tables
def _percent(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _table(header: list[str], row: list[str]) -> str:
    widths = [max(len(h), len(v)) for h, v in zip(header, row)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def format_benchmark_tables(metrics: dict[str, Any], model_name: str = "MM-GEM") -> str:
    """The results as the papers lay them out (percentages; CIDEr x 100), one table per family present."""
    tables = []
    retrieval = [b for b in ("flickr30k", "coco") if f"{b}/image_to_text/R@1" in metrics]
    if retrieval:
        header, row = ["Model"], [model_name]
        for bench in retrieval:
            label = "Flickr30K" if bench == "flickr30k" else "COCO"
            for direction, arrow in (("image_to_text", "I→T"), ("text_to_image", "T→I")):
                for k in RECALL_KS:
                    header.append(f"{label} {arrow} R@{k}")
                    row.append(_percent(metrics, f"{bench}/{direction}/R@{k}"))
        tables.append("Zero-shot retrieval (Karpathy test)\n" + _table(header, row))
    for bench in ("imagenet", "imagefolder"):
        if f"{bench}/top1" in metrics:
            label = "ImageNet" if bench == "imagenet" else "ImageFolder"
            tables.append(
                "Zero-shot classification\n"
                + _table(
                    ["Model", f"{label} top-1", f"{label} top-5"],
                    [model_name, _percent(metrics, f"{bench}/top1"), _percent(metrics, f"{bench}/top5")],
                )
            )
    long = [b for b in ("urban1k", "docci", "dci", "sharegpt4v-1k") if f"{b}/image_to_text/R@1" in metrics]
    if long:
        names = {"urban1k": "Urban1k", "docci": "DOCCI", "dci": "DCI", "sharegpt4v-1k": "ShareGPT4V-1k"}
        header, row = ["Model"], [model_name]
        for bench in long:
            header += [f"{names[bench]} I2T", f"{names[bench]} T2I"]
            row += [_percent(metrics, f"{bench}/image_to_text/R@1"), _percent(metrics, f"{bench}/text_to_image/R@1")]
        tables.append("Long-text retrieval (R@1)\n" + _table(header, row))
    if "coco-captions/bleu4" in metrics:
        keys = [("B@4", "bleu4"), ("M", "meteor"), ("C", "cider"), ("S", "spice")]
        tables.append(
            "COCO captioning (Karpathy test)\n"
            + _table(
                ["Model"] + [k for k, _ in keys],
                [model_name] + [_percent(metrics, f"coco-captions/{m}") for _, m in keys],
            )
        )
    if "refcocog/region_to_text/R@1" in metrics:
        keys = [
            ("CIDEr", "region_caption/cider"),
            ("METEOR", "region_caption/meteor"),
            ("Region→Text R@1", "region_to_text/R@1"),
            ("Text→Region R@1", "text_to_region/R@1"),
        ]
        tables.append(
            "RefCOCOg region captioning and retrieval\n"
            + _table(
                ["Model"] + [k for k, _ in keys], [model_name] + [_percent(metrics, f"refcocog/{m}") for _, m in keys]
            )
        )
    return "\n\n".join(tables)
