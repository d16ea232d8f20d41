"""Streaming training data from one or several sources in the published layouts, mixed by weight.

`mmgem train --data SRC[::SRC...]` reads each `SRC` with the reader of its format (`mmgem.data.formats`; detected,
or named by `--data-format`), draws from the sources in proportion to `--data-weights`, and yields the items the
training collator consumes (`{"image": RGB PIL image, "caption": str, "regions": [{"box", "caption"}]}`).

- Streaming: :class:`StreamingImageTextDataset` is an `IterableDataset` that holds no image: each is read and
  decoded when it is yielded, in the DataLoader worker, so memory does not grow with the number of samples (the
  in-memory annotation files of the JSON formats are the only per-sample state, a few hundred bytes each).
- Split: each rank and each of its DataLoader workers reads its own part (:func:`current_shard`); shards of a
  webdataset source, rows of a table, entries of an annotation file.
- Endless: a source starts its next epoch (reshuffled) when its part is used up; the run's length is `max_steps`,
  or `--train-num-samples` (converted to steps by :func:`steps_for_samples`).
- Bad records: every sample is converted and validated with the checks of `mmgem.data.records` (image readable,
  caption a non-empty string, boxes inside the image); `on_error="fail"` raises a ValueError naming the source,
  the sample and the problem, `"skip"` drops it with a warning (the first problems one by one, then a count every
  :data:`SKIP_REPORT_EVERY`).
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mmgem.data.formats import RawSample, Shard, Source, SourceOptions
from mmgem.data.formats.detect import _HUB_ID, FORMATS, _is_shard_pattern, detect_format, open_source
from mmgem.data.paths import opt_in_hint
from mmgem.data.records import (
    ImageRecord,
    RegionRecord,
    _box_problem,
    _build_record,
    _check_policy,
    shorten,
)
from modeling_mmgem.image_loading_mmgem import load_rgb_image

SOURCE_SEPARATOR = "::"
SKIP_REPORT_EVERY = 1000
SKIP_WARNINGS = 20  # bad samples warned about one by one, then a count every SKIP_REPORT_EVERY


@dataclass
class DataSourceArguments:
    """The training options about data sources (fields of `MMGEMTrainingArguments`)."""

    data_format: str | None = field(
        default=None,
        metadata={
            "help": "Format of --data (one for all sources, or one per source joined with '::'): webdataset, grit, "
            "hf, llava, coco, karpathy, visual-genome, refcoco, jsonl, imagefolder. Default: detected."
        },
    )
    data_weights: str | None = field(
        default=None, metadata={"help": "Sampling weights of the --data sources, joined with '::' (default equal)."}
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder the format's image paths are relative to ('::' per source)."}
    )
    image_column: str | None = field(default=None, metadata={"help": "hf format: the image column (default image)."})
    caption_column: str | None = field(
        default=None, metadata={"help": "hf format: the caption column (default caption)."}
    )
    regions_column: str | None = field(
        default=None,
        metadata={"help": "hf format: a column of [{box, caption}] pixel regions, or GRIT's noun_chunks."},
    )
    data_split: str | None = field(
        default=None, metadata={"help": "Split of Karpathy / RefCOCO / datasets data (default train)."}
    )
    data_resampled: bool = field(
        default=False, metadata={"help": "webdataset: draw shards with replacement (endless, any shard count)."}
    )
    shuffle_buffer: int = field(default=1000, metadata={"help": "webdataset: samples in the shuffle buffer."})
    train_num_samples: int | None = field(
        default=None, metadata={"help": "Samples to train on (sets max_steps from the global batch size)."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream a .jsonl or imagefolder too (other formats always stream)."}
    )


def split_sources(value: str | None) -> list[str]:
    """`"a::b"` -> `["a", "b"]` (None or "" -> []; empty entries are not allowed)."""
    if value is None or value == "":
        return []
    parts = value.split(SOURCE_SEPARATOR)
    if any(not part.strip() for part in parts):
        raise ValueError(f"empty entry in {value!r} (sources are joined with '{SOURCE_SEPARATOR}').")
    return [part.strip() for part in parts]


def _per_source(value: str | None, count: int, flag: str) -> list[str | None]:
    parts = split_sources(value)
    if not parts:
        return [None] * count
    if len(parts) == 1:
        return parts * count
    if len(parts) != count:
        raise ValueError(f"`{flag}` has {len(parts)} entries for {count} `--data` sources (give 1 or {count}).")
    return list(parts)


def parse_weights(value: str | None, count: int) -> list[float]:
    """`--data-weights` -> one positive weight per source (default equal; "" too)."""
    if value is None or value == "":
        return [1.0] * count
    parts = split_sources(value)
    try:
        weights = [float(p) for p in parts]
    except ValueError as error:
        raise ValueError(f"`--data-weights` must be numbers joined with '::'; got {value!r}.") from error
    if len(weights) != count:
        raise ValueError(f"`--data-weights` has {len(weights)} weights for {count} `--data` sources.")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise ValueError(f"`--data-weights` must be positive; got {value!r}.")
    return weights


def uses_streaming(args: Any) -> bool:
    """Whether `train` reads `args.data` through the streaming sources (always, except one .jsonl/imagefolder)."""
    specs = split_sources(args.data)
    if args.streaming or len(specs) != 1 or args.train_num_samples is not None:
        return True
    data_format = args.data_format or detect_format(specs[0])
    return data_format not in ("jsonl", "imagefolder")


def open_sources(args: Any, shuffle: bool = True) -> tuple[list[Source], list[float]]:
    """The sources and weights of the training options (opening checks the paths and annotation files)."""
    specs = split_sources(args.data)
    formats = _per_source(args.data_format, len(specs), "--data-format")
    roots = _per_source(args.image_root, len(specs), "--image-root")
    weights = parse_weights(args.data_weights, len(specs))
    sources = []
    for spec, data_format, root in zip(specs, formats, roots):
        options = SourceOptions(
            image_root=root,
            image_column=args.image_column,
            caption_column=args.caption_column,
            regions_column=args.regions_column,
            split=args.data_split,
            resampled=args.data_resampled,
            shuffle=shuffle,
            shuffle_buffer=args.shuffle_buffer,
            allow_outside_data_root=bool(getattr(args, "allow_outside_data_root", False)),
        )
        sources.append(open_source(spec, data_format, options, args.data_on_error))
    return sources, weights


def current_shard() -> Shard:
    """This process's and DataLoader worker's share: rank-major index among `world_size x num_workers` readers."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    worker = get_worker_info()
    worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
    return Shard(index=rank * workers + worker_id, count=world * workers)


def steps_for_samples(num_samples: int, per_device_batch: int, world_size: int, accumulation: int = 1) -> int:
    """Optimizer steps that consume `num_samples` samples at the global batch size (rounded up)."""
    if num_samples < 1:
        raise ValueError(f"`--train-num-samples` must be a positive int; got {num_samples!r}.")
    return math.ceil(num_samples / (per_device_batch * world_size * accumulation))


# ---------------------------------------------------------------------------------------------------------- samples
def _open_image(value: Any) -> tuple[Image.Image | None, str | None]:
    """A loaded RGB image from a path, encoded bytes or a PIL image, or None and the problem."""
    try:
        return load_rgb_image(value), None
    except ValueError as error:
        return None, f"cannot read the image ({error}; expected a JPEG, PNG, WebP or other PIL-readable image)"


def _clip(box: list[float], size: tuple[int, int]) -> list[float]:
    width, height = size
    return [
        min(max(box[0], 0), width),
        min(max(box[1], 0), height),
        min(max(box[2], 0), width),
        min(max(box[3], 0), height),
    ]


def _pixel_regions(raw: dict[str, Any], size: tuple[int, int]) -> tuple[Any, list[str]]:
    """The raw regions with pixel boxes: normalised boxes scaled, overhanging boxes clipped where the format says."""
    regions = raw.get("regions")
    if not isinstance(regions, list):
        return regions, []
    width, height = size
    converted, problems = [], []
    for index, region in enumerate(regions):
        if isinstance(region, dict) and "box_normalized" in region:
            box = region["box_normalized"]
            problem = _box_problem(box, (1, 1))
            if problem:
                problems.append(f"region {index}: normalised {problem.replace('1x1 image', 'unit square')}")
                continue
            region = {**region, "box": [box[0] * width, box[1] * height, box[2] * width, box[3] * height]}
            del region["box_normalized"]
        elif raw.get("clip_boxes") and isinstance(region, dict) and _box_problem(region.get("box"), None) is None:
            region = {**region, "box": _clip(list(region["box"]), size)}
        converted.append(region)
    return converted, problems


def materialize(sample: RawSample, rng: random.Random) -> tuple[ImageRecord | None, list[str]]:
    """Decode and validate a raw sample: an :class:`ImageRecord` with a loaded image, or None and the problems."""
    if sample.raw is None:
        return None, [sample.problem or "unreadable sample"]
    raw = sample.raw
    image, problem = _open_image(raw.get("image"))
    if image is None:
        return None, [problem]
    fields = {k: raw[k] for k in ("caption", "long_caption") if raw.get(k) is not None}
    captions = raw.get("captions")
    if captions is not None:
        usable = [c for c in captions if isinstance(c, str) and c.strip()] if isinstance(captions, list) else []
        if usable:
            fields["caption"] = rng.choice(usable)
    regions, problems = _pixel_regions(raw, image.size)
    if regions is not None:
        fields["regions"] = regions
    return _build_record(fields, image, image.size, 0, problems)


class StreamingImageTextDataset(IterableDataset):
    """Training items drawn from `sources` in proportion to `weights`; see the module docstring.

    Args:
        sources: the readers (:func:`open_sources`).
        weights: one positive sampling weight per source.
        on_error: "fail" or "skip" for bad samples.
        use_long_caption: the items' caption is the record's long caption (a sample without one is bad).
        with_regions: include regions (stage 2); otherwise "regions" is empty.
        seed: shuffling and mixing seed (each reader derives its own from it).
        epochs: passes over each source (None: endless, the training default; 1: one pass, for evaluation).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Sequence[float] | None = None,
        on_error: str = "fail",
        use_long_caption: bool = False,
        with_regions: bool = True,
        seed: int = 0,
        epochs: int | None = None,
    ) -> None:
        _check_policy(on_error)
        if not sources:
            raise ValueError("StreamingImageTextDataset needs at least one source.")
        self.sources = list(sources)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.sources)
        if len(self.weights) != len(self.sources):
            raise ValueError(f"{len(self.weights)} weights for {len(self.sources)} sources.")
        self.on_error = on_error
        self.use_long_caption = use_long_caption
        self.with_regions = with_regions
        self.seed = seed
        self.epochs = epochs
        self.skipped = 0
        self.shard: Shard | None = None  # fixed for tests and benchmarks; None: from the rank and worker

    splits_by_rank = True  # each rank reads its own part: the Trainer must not split the stream again

    def _records(self, source: Source, shard: Shard) -> Iterator[ImageRecord]:
        """Valid records of one source for this reader, epoch after epoch."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            produced = 0
            rng = random.Random(f"{self.seed}-{epoch}-{shard.index}-{source.name}")
            for sample in source.samples(shard, epoch, self.seed):
                record, problems = materialize(sample, rng)
                if record is not None and self.use_long_caption and not record.long_caption:
                    record, problems = None, ["no long caption (use_long_caption is on)"]
                if record is None:
                    self._bad(source, sample.key, problems)
                    continue
                produced += 1
                yield record
            if produced == 0 and self.epochs is None:
                raise ValueError(
                    f"{source.name}: no usable sample for reader {shard.index} of {shard.count} (ranks x DataLoader "
                    "workers). A webdataset source needs at least one shard per reader (or --data-resampled)."
                )
            epoch += 1

    def _bad(self, source: Source, key: str, problems: list[str]) -> None:
        details = shorten(f"{key}: " + "; ".join(problems)) + opt_in_hint(problems)
        if self.on_error == "fail":
            raise ValueError(f"{details} (pass --data-on-error skip to drop bad samples).")
        self.skipped += 1
        if self.skipped <= SKIP_WARNINGS:
            warnings.warn(f"skipped {details}", stacklevel=2)
        elif self.skipped % SKIP_REPORT_EVERY == 0:
            warnings.warn(f"{source.name}: {self.skipped} bad samples skipped so far in this reader", stacklevel=2)

    def _item(self, record: ImageRecord) -> dict[str, Any]:
        regions = record.regions if self.with_regions else []
        return {
            "image": record.image,
            "caption": record.long_caption if self.use_long_caption else record.caption,
            "regions": [{"box": list(r.box), "caption": r.caption} for r in regions],
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard = self.shard or current_shard()
        streams = [self._records(source, shard) for source in self.sources]
        weights = list(self.weights)
        rng = random.Random(f"{self.seed}-mix-{shard.index}")
        active = list(range(len(streams)))
        while active:
            choice = rng.choices(active, weights=[weights[i] for i in active])[0]
            try:
                record = next(streams[choice])
            except StopIteration:
                active.remove(choice)
                continue
            yield self._item(record)

    def take_texts(self, count: int) -> list[TextRecord]:
        """The texts of the first `count` valid samples of one pass (for a tokenizer trained on the data).

        Images are decoded (validation needs them) but not kept.
        """
        sampler = StreamingImageTextDataset(
            self.sources, self.weights, self.on_error, self.use_long_caption, True, self.seed, epochs=1
        )
        sampler.shard = Shard()
        texts = []
        for item in sampler:
            regions = [RegionRecord(box=list(r["box"]), caption=r["caption"]) for r in item["regions"]]
            texts.append(TextRecord(caption=item["caption"], long_caption=item["caption"], regions=regions))
            if len(texts) >= count:
                break
        return texts


@dataclass
class TextRecord:
    """The texts of a record without its image: what `mmgem.training.train.training_texts` reads."""

    caption: str
    long_caption: str | None = None
    regions: list[RegionRecord] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------- training
TOKENIZER_SAMPLES = 10_000  # texts a from-scratch tokenizer is trained on
CHECK_SAMPLES = 64  # samples read before training starts, to fail early on a wrong format or column


def _source_exists(spec: str) -> bool:
    return os.path.exists(spec) or _is_shard_pattern(spec) or bool(_HUB_ID.match(spec))


def check_data_arguments(args: Any) -> None:
    """The data options' ValueErrors (naming the flag), before anything is read."""
    specs = split_sources(args.data)
    for spec in specs:
        if not _source_exists(spec):
            raise ValueError(f"`data` does not exist: {spec}.")
    for data_format in _per_source(args.data_format, len(specs), "--data-format"):
        if data_format is not None and data_format not in FORMATS:
            raise ValueError(f"`--data-format` must be one of {FORMATS}; got {data_format!r}.")
    _per_source(args.image_root, len(specs), "--image-root")
    parse_weights(args.data_weights, len(specs))
    if args.train_num_samples is not None and args.train_num_samples < 1:
        raise ValueError(f"`--train-num-samples` must be a positive int; got {args.train_num_samples!r}.")
    if args.shuffle_buffer < 0:
        raise ValueError(f"`--shuffle-buffer` must be >= 0; got {args.shuffle_buffer!r}.")


def streaming_max_steps(args: Any) -> int:
    """The run's length for a streaming source (which has none of its own): `max_steps`, else the steps that
    `train_num_samples` take at the global batch size. A ValueError when neither is given."""
    if args.max_steps > 0:
        return args.max_steps
    if args.train_num_samples is not None:
        return steps_for_samples(
            args.train_num_samples, args.per_device_train_batch_size, args.world_size, args.gradient_accumulation_steps
        )
    raise ValueError("Streaming `data` has no length: give `--max-steps` or `--train-num-samples`.")


def streaming_training_data(args: Any) -> tuple[StreamingImageTextDataset, list[TextRecord]]:
    """The training stream of `args` and the texts of its first samples. Each rank reads its own part, so the
    caller trains for :func:`streaming_max_steps` with accelerate's batch dispatching off."""
    streaming_max_steps(args)  # the length is checked before any source is opened
    sources, weights = open_sources(args)
    dataset = StreamingImageTextDataset(
        sources, weights, args.data_on_error, args.use_long_caption, args.stage == 2, seed=args.seed
    )
    wanted = TOKENIZER_SAMPLES if args.from_scratch is not None else CHECK_SAMPLES
    return dataset, dataset.take_texts(wanted)
