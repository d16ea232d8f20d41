"""Evaluate MM-GEM on a JSON Lines split: retrieval, zero-shot classification, captioning, regions.

Command line::

    mmgem evaluate --model OUT --data test.jsonl --output metrics.json [--labels labels.json] [--tasks ...]

Metrics (flat keys, the same in `metrics.json` and in the demo's `demo-output/metrics.json`):

- `image_to_text/R@{1,5,10}`, `text_to_image/R@{1,5,10}`: retrieval between the split's images and their captions.
  A retrieved caption (image) counts when its text equals the query's own caption (after `normalize_text`): many
  images of a split can share a caption, and any of them is a right answer.
- `zero_shot/accuracy`: classification of the records that have a label (their `label` field, or for the synthetic
  shapes the class of single-object images) among the classes of labels.json. A class's score is, with
  `template_reduction="mean"`, the cosine with the mean of its normalised prompt embeddings (prompt ensembling, as
  CLIP); with `"max"`, its best prompt's cosine. "max" suits templates that enumerate a nuisance attribute, such as
  the sizes of the synthetic shapes ("a small {}", "a large {}"): an object is small OR large, and the average of
  the two descriptions matches neither. `templates_for` picks "max" for those.
- `caption/{bleu4,cider,exact_match}`: greedy captions of the images against the record's caption
  (definitions in `mmgem.evaluation.metrics`).
- `region_caption/{bleu4,cider,exact_match}`: the same for each region box against its caption.
- `region_retrieval/R@1` (region -> text: each region ranks the split's distinct region captions) and
  `region_retrieval/text_to_region_R@1` (each distinct region caption ranks all regions of the split; a region with
  an equal caption counts).
- `num_images`, `num_regions`, `zero_shot/num_examples`, `num_caption_images`, `num_caption_regions`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmgem.cli import command_parser
from mmgem.errors import checking_user_input
from mmgem.evaluation.cli_benchmarks import add_benchmark_arguments, run_benchmark_command
from mmgem.evaluation.metrics import caption_metrics, same_text_relevance
from mmgem.evaluation.tasks import CaptioningTask, EmbeddingCache, RegionTask, RetrievalTask, ZeroShotTask, run_tasks
from mmgem.files import write_json_atomic
from mmgem.synthetic import class_name

TASKS = ("retrieval", "zero_shot", "captioning", "region_captioning", "region_retrieval")
TEMPLATE_REDUCTIONS = ("mean", "max")
RECALL_KS = (1, 5, 10)
DEFAULT_TEMPLATES = ("a {}", "a photo of a {}")


@dataclass
class EvaluationResult:
    """Metrics plus what produced them (for examples and plots)."""

    metrics: dict[str, float]
    captions: list[tuple[str, str]] = field(default_factory=list)  # (reference, generated) per captioned image
    region_captions: list[tuple[str, str]] = field(default_factory=list)
    similarity: torch.Tensor | None = None  # [num_images, num_images] image x caption cosine similarities
    zero_shot: list[tuple[str, str]] = field(default_factory=list)  # (label, predicted class)


# ---------------------------------------------------------------------------------------------------------- helpers
def default_label(record: Any) -> str | None:
    """A record's zero-shot label: its `label` field, or for the synthetic shapes the class of a lone object."""
    label = record.metadata.get("label")
    if isinstance(label, str):
        return label
    objects = record.metadata.get("objects") or []
    if len(objects) == 1 and {"colour", "shape"} <= set(objects[0]):
        return class_name(objects[0]["colour"], objects[0]["shape"])
    return None


def templates_for(
    labels: dict[str, Any] | None, templates: Sequence[str] | None = None, reduction: str | None = None
) -> tuple[list[str], str]:
    """Prompt templates and how to reduce them (see the module docstring).

    Templates: the given ones, else labels.json's "templates", else one per size of the synthetic shapes
    ("a small {}", "a large {}", the way their captions describe single objects; reduction "max"), else
    :data:`DEFAULT_TEMPLATES`. Reduction: the given one, else labels.json's "template_reduction", else "max" for the
    size templates and "mean" otherwise.
    """
    default_reduction = "mean"
    if templates:
        chosen = list(templates)
    elif labels and labels.get("templates"):
        chosen = list(labels["templates"])
        default_reduction = labels.get("template_reduction", "mean")
    elif labels and labels.get("sizes"):
        chosen = [f"a {size} {{}}" for size in labels["sizes"]]
        default_reduction = "max"
    else:
        chosen = list(DEFAULT_TEMPLATES)
    for template in chosen:
        if template.count("{}") != 1:
            raise ValueError(f"`templates` entries need exactly one '{{}}' for the class name; got {template!r}.")
    reduction = reduction or default_reduction
    if reduction not in TEMPLATE_REDUCTIONS:
        raise ValueError(f"`template_reduction` must be one of {TEMPLATE_REDUCTIONS}; got {reduction!r}.")
    return chosen, reduction


def evaluate_model(
    model: Any,
    processor: Any,
    records: Sequence[Any],
    *,
    tasks: Sequence[str] = TASKS,
    classes: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    template_reduction: str = "mean",
    label_fn: Callable[[Any], str | None] = default_label,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    max_caption_images: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate an MMGEMModel on records (from `mmgem.data.records`); see the module docstring for the metrics.

    Args:
        model, processor: the model (put in eval mode here) and its processor.
        records: the evaluation split.
        tasks: a subset of :data:`TASKS`.
        classes: zero-shot class names (default: the labels found in `records`).
        templates: zero-shot prompt templates, each with one `{}`.
        template_reduction: "mean" (prompt ensembling) or "max" (best prompt) per class.
        label_fn: a record's zero-shot label, or None to leave it out.
        batch_size: images or texts per forward.
        max_new_tokens, num_beams: caption decoding.
        max_caption_images: caption (and region-caption) only the first N images, to bound the generation time.
        progress: tqdm progress bars.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"`tasks` must be a subset of {TASKS}; got unknown {unknown}.")
    if template_reduction not in TEMPLATE_REDUCTIONS:
        raise ValueError(f"`template_reduction` must be one of {TEMPLATE_REDUCTIONS}; got {template_reduction!r}.")
    if not records:
        raise ValueError("`records` is empty: nothing to evaluate.")
    model.eval()
    images = [r.load_image() for r in tqdm(records, desc="Loading images", disable=not progress, leave=False)]
    captions = [r.caption for r in records]
    region_texts = [region.caption for r in records for region in r.regions]
    result = EvaluationResult(metrics={"num_images": len(records), "num_regions": len(region_texts)})
    # Regions are embedded in the processor's frame as training sees them (no padding to a square).
    cache = EmbeddingCache(model, processor, None, batch_size, progress, max_new_tokens, num_beams, pad_regions=False)
    limit = len(records) if max_caption_images is None else min(max_caption_images, len(records))
    planned = _plan_tasks(records, images, tasks, classes, templates, template_reduction, label_fn, limit)
    metrics = run_tasks(list(planned.values()), cache)
    result.metrics.update(_documented_metrics(metrics))
    if "retrieval" in planned:
        result.similarity = cache.images(images) @ cache.texts(captions).t()  # [N images, N captions], cached
    if "zero_shot" in planned:
        task = planned["zero_shot"]
        result.zero_shot = [(task.classes[label], task.classes[p]) for label, p in zip(task.labels, task.predictions)]
    if "caption" in planned:
        task = planned["caption"]
        result.captions = [(refs[0], text) for refs, text in zip(task.references, task.generated)]
    if "region_caption" in planned:
        task = planned["region_caption"]
        result.region_captions = [(refs[0], text) for refs, text in zip(task.references, task.generated)]
    return result


def _plan_tasks(
    records: Sequence[Any],
    images: list[Any],
    tasks: Sequence[str],
    classes: Sequence[str] | None,
    templates: Sequence[str],
    template_reduction: str,
    label_fn: Callable[[Any], str | None],
    limit: int,
) -> dict[str, Any]:
    """The engine's tasks for `tasks` on a split, by metric prefix (tasks with nothing to measure are left out)."""
    captions = [r.caption for r in records]
    boxes = [[region.box for region in r.regions] for r in records]
    planned: dict[str, Any] = {}
    if "retrieval" in tasks:
        relevant = same_text_relevance(captions, captions)  # image i and caption j match when caption i == caption j
        planned["retrieval"] = RetrievalTask("retrieval", images, captions, ks=RECALL_KS, relevant=relevant)
    labelled = [(image, label_fn(r)) for image, r in zip(images, records)] if "zero_shot" in tasks else []
    labelled = [(image, label) for image, label in labelled if label is not None]
    if labelled:
        class_list = list(classes) if classes else sorted({label for _, label in labelled})
        unknown = sorted({label for _, label in labelled} - set(class_list))
        if unknown:
            raise ValueError(f"zero-shot labels {unknown[:5]} are not among the classes of `labels`.")
        planned["zero_shot"] = ZeroShotTask(
            "zero_shot",
            [p[0] for p in labelled],
            [class_list.index(p[1]) for p in labelled],
            class_list,
            list(templates),
            template_reduction,
        )
    if "captioning" in tasks:
        planned["caption"] = CaptioningTask(
            "caption", images[:limit], [[c] for c in captions[:limit]], scorer=caption_metrics
        )
    if "region_captioning" in tasks and any(boxes[:limit]):
        references = [[region.caption] for r in records[:limit] for region in r.regions]
        planned["region_caption"] = CaptioningTask(
            "region_caption", images[:limit], references, boxes[:limit], scorer=caption_metrics
        )
    if "region_retrieval" in tasks and any(boxes):
        sentences = [[region.caption] for r in records for region in r.regions]
        planned["region_retrieval"] = RegionTask(
            "region_retrieval", images, boxes, sentences, distinct_texts=True, caption=False
        )
    return planned


# The engine's keys -> the keys this module documents (`mmgem evaluate --data`, the demo's metrics.json).
RENAMED_METRICS = {
    "zero_shot/top1": "zero_shot/accuracy",
    "zero_shot/num_images": "zero_shot/num_examples",
    "caption/num_images": "num_caption_images",
    "region_caption/num_regions": "num_caption_regions",
    "region_retrieval/region_to_text/R@1": "region_retrieval/R@1",
    "region_retrieval/text_to_region/R@1": "region_retrieval/text_to_region_R@1",
}
DROPPED_METRICS = (
    "retrieval/num_images",
    "retrieval/num_texts",
    "zero_shot/top5",
    "zero_shot/num_classes",
    "region_caption/num_images",
    "region_retrieval/num_regions",
)


def _documented_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The engine's metrics under the keys of the module docstring (`retrieval/` dropped from retrieval keys)."""
    renamed = {}
    for key, value in metrics.items():
        if key in DROPPED_METRICS:
            continue
        key = RENAMED_METRICS.get(key, key.removeprefix("retrieval/"))
        renamed[key] = value
    return renamed


# ---------------------------------------------------------------------------------------------------------- output
TABLE_ROWS = (
    ("Image -> text R@1 / R@5 / R@10", ("image_to_text/R@1", "image_to_text/R@5", "image_to_text/R@10")),
    ("Text -> image R@1 / R@5 / R@10", ("text_to_image/R@1", "text_to_image/R@5", "text_to_image/R@10")),
    ("Zero-shot accuracy", ("zero_shot/accuracy",)),
    ("Caption BLEU-4 / CIDEr / exact match", ("caption/bleu4", "caption/cider", "caption/exact_match")),
    (
        "Region caption BLEU-4 / CIDEr / exact match",
        ("region_caption/bleu4", "region_caption/cider", "region_caption/exact_match"),
    ),
    ("Region -> text R@1 / text -> region R@1", ("region_retrieval/R@1", "region_retrieval/text_to_region_R@1")),
)


def format_table(metrics: dict[str, float], title: str | None = None) -> str:
    """A readable fixed-width table of the metrics that are present."""
    lines = [title] if title else []
    rows = [(name, " / ".join(f"{metrics[k]:.3f}" for k in keys)) for name, keys in TABLE_ROWS if keys[0] in metrics]
    counts = ", ".join(
        f"{k} {int(metrics[k])}"
        for k in ("num_images", "num_regions", "zero_shot/num_examples", "num_caption_images")
        if k in metrics
    )
    width = max([len(name) for name, _ in rows] + [6])
    lines += [f"| {'Metric'.ljust(width)} | Value{' ' * 17}|", f"|{'-' * (width + 2)}|{'-' * 23}|"]
    lines += [f"| {name.ljust(width)} | {value.ljust(21)} |" for name, value in rows]
    if counts:
        lines.append(f"({counts})")
    return "\n".join(lines)


def write_metrics(metrics: dict[str, float], path: str | os.PathLike[str]) -> Path:
    """Write metrics as JSON atomically (a temp file renamed into place)."""
    return write_json_atomic(path, metrics, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("evaluate", "Evaluate an MM-GEM model on a .jsonl split (or an imagefolder).")
    parser.add_argument("--model", required=True, help="MM-GEM model folder or Hub id")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow Python code shipped in the --model folder to run"
    )
    parser.add_argument("--data", help="evaluation split (.jsonl, or an imagefolder); or use --benchmark")
    parser.add_argument("--output", help="metrics JSON file to write")
    parser.add_argument("--labels", help="labels.json with the zero-shot 'classes' (default: next to --data)")
    parser.add_argument("--templates", nargs="+", help="zero-shot prompt templates, each with one {}")
    parser.add_argument(
        "--template-reduction", choices=TEMPLATE_REDUCTIONS, help="per class: mean prompt embedding or best prompt"
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="what to evaluate")
    parser.add_argument("--batch-size", type=int, default=64, help="images or texts per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="caption length limit")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width of the captions (1: greedy)")
    parser.add_argument("--max-caption-images", type=int, help="caption only the first N images")
    parser.add_argument(
        "--data-on-error",
        choices=("fail", "skip"),
        default="fail",
        help="bad records: stop with the list of problems, or skip them with a warning",
    )
    parser.add_argument(
        "--allow-outside-data-root", action="store_true", help="accept image paths outside the --data folder"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")

    add_benchmark_arguments(parser)
    return parser


def _load_labels(labels: str | None, data: str) -> dict[str, Any] | None:
    path = Path(labels) if labels else Path(data).resolve().parent / "labels.json"
    if labels and not path.is_file():
        raise ValueError(f"`labels` file does not exist: {labels}.")
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    """`mmgem evaluate ...`: print the table and write the JSON metrics."""
    args = build_parser().parse_args(argv)
    with checking_user_input():
        for name in ("batch_size", "max_new_tokens", "num_beams"):
            if getattr(args, name) < 1:
                raise ValueError(f"`--{name.replace('_', '-')}` must be a positive int; got {getattr(args, name)}.")
    if args.benchmark:
        return run_benchmark_command(args)
    with checking_user_input():
        if not args.data:
            raise ValueError(
                "`--data` is required (an evaluation .jsonl or imagefolder), unless `--benchmark` is given."
            )
        if not Path(args.data).exists():
            raise ValueError(f"`--data` does not exist: {args.data}.")
        labels = _load_labels(args.labels, args.data)
        templates, reduction = templates_for(labels, args.templates, args.template_reduction)
        from mmgem.data.records import load_records
        from mmgem.loading import load_model

        records = load_records(args.data, args.data_on_error, args.allow_outside_data_root)
        if not records:
            raise ValueError(f"`--data` {args.data} holds no record to evaluate (expected one JSON object per line).")
    model, processor = load_model(args.model, args.trust_remote_code, argument="--model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate_model(
        model.to(device),
        processor,
        records,
        tasks=args.tasks,
        classes=(labels or {}).get("classes"),
        templates=templates,
        template_reduction=reduction,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        max_caption_images=args.max_caption_images,
        progress=not args.no_progress,
    )
    print(format_table(result.metrics, title=f"MM-GEM {args.model} on {args.data}"))
    if args.output:
        print(f"Wrote {write_metrics(result.metrics, args.output)}")
    return 0
