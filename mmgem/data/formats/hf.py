"""Hugging Face datasets: a `save_to_disk` folder, parquet / arrow files (or a folder of them), or a Hub repo id.

Columns are mapped by name: `--image-column` (default `image`: a `datasets.Image` value, encoded bytes, a PIL image
or a path relative to `--image-root`), `--caption-column` (default `caption`; a list of strings gives several
references), and optionally `--regions-column` holding the project's `[{"box": [x0, y0, x1, y1], "caption"}]`
pixels, or GRIT's `noun_chunks` (then the caption column holds the text the spans point into).

Local data is memory-mapped Arrow (`datasets` reads parquet into its cache once), accessed by index, so readers
split it exactly and memory does not grow with its size. A Hub repo id is streamed (`streaming=True`): ranks get
disjoint parts through `datasets.distributed.split_dataset_by_node`, and DataLoader workers split its files as
`datasets` does (a repo with fewer files than workers leaves some workers idle).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmgem.data.formats import IndexedSource, RawSample, Shard, Source, SourceOptions
from mmgem.data.formats.grit import grit_regions
from mmgem.data.paths import OPT_IN, resolve_in_root
from mmgem.optional import require

TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}

DATASETS_PURPOSE = "Reading Hugging Face datasets (--data-format hf)"


def is_dataset_folder(path: Path) -> bool:
    """A `save_to_disk` folder (a Dataset or a DatasetDict)."""
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def table_files(path: Path) -> list[Path]:
    """The parquet/arrow files of a file or folder (sorted), or []."""
    if path.is_file():
        return [path] if path.suffix in TABLE_SUFFIXES else []
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES and p.is_file())
    return []


class RowConverter:
    """A table row -> raw record, by the column mapping of `options`."""

    def __init__(self, options: SourceOptions, root: Path | None) -> None:
        self.image_column = options.image_column or "image"
        self.caption_column = options.caption_column or "caption"
        self.regions_column = options.regions_column
        self.root = Path(options.image_root) if options.image_root else root
        self.allow_outside = options.allow_outside_data_root

    def check_columns(self, columns: list[str], name: str) -> None:
        wanted = {"--image-column": self.image_column, "--caption-column": self.caption_column}
        if self.regions_column:
            wanted["--regions-column"] = self.regions_column
        for flag, column in wanted.items():
            if column not in columns:
                raise ValueError(f"{name}: no column {column!r} for `{flag}` (columns: {columns}).")

    def __call__(self, row: dict[str, Any], key: str) -> RawSample:
        image, problem = self._image(row.get(self.image_column))
        if problem:
            return RawSample(key, None, problem)
        caption = row.get(self.caption_column)
        raw: dict[str, Any] = {"image": image}
        if isinstance(caption, list):
            raw["captions"] = caption
        else:
            raw["caption"] = caption
        if self.regions_column:
            value = row.get(self.regions_column)
            if self.regions_column in ("noun_chunks", "ref_exps"):
                regions, problem = grit_regions(caption, row, self.regions_column)
                if problem:
                    return RawSample(key, None, problem)
                raw["regions"] = regions
            else:
                raw["regions"] = value
        return RawSample(key, raw)

    def _image(self, value: Any) -> tuple[Any, str | None]:
        if isinstance(value, dict):  # an undecoded datasets.Image value
            if value.get("bytes"):
                return value["bytes"], None
            value = value.get("path")
        if isinstance(value, bytes) or hasattr(value, "mode"):  # encoded bytes or a PIL image
            return value, None
        if isinstance(value, str) and value:
            if self.root is None and not self.allow_outside:  # a Hub dataset naming a file of this machine
                return None, f"image path {value[:200]!r} in a Hub dataset ({OPT_IN})"
            if self.root is None:  # opted in: the path as written (relative to the working folder)
                path, problem = Path(value), None
            else:
                path, problem = resolve_in_root(self.root, value, allow_outside=self.allow_outside)
            if path is None:
                return None, problem
            return (str(path), None) if path.is_file() else (None, f"image file not found: {path}")
        return None, f"no image in column {self.image_column!r} (got {type(value).__name__})"


def _undecoded(dataset: Any, column: str) -> Any:
    """The dataset with its image column left as bytes/path (decoded later, in the worker, with error handling)."""
    datasets = require("datasets", "data", DATASETS_PURPOSE)

    feature = dataset.features.get(column) if dataset.features else None
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


class ArrowSource(IndexedSource):
    """A local dataset (memory-mapped Arrow), read by index."""

    def __init__(self, path: str, options: SourceOptions, converter: type[RowConverter] = RowConverter) -> None:
        datasets = require("datasets", "data", DATASETS_PURPOSE)

        folder = Path(path)
        self.name = f"hf:{path}"
        if is_dataset_folder(folder):
            dataset = datasets.load_from_disk(str(folder))
            if isinstance(dataset, datasets.DatasetDict):
                split = options.split or "train"
                if split not in dataset:
                    raise ValueError(f"{path}: no split {split!r} for `--data-split` (splits: {list(dataset)}).")
                dataset = dataset[split]
        else:
            files = table_files(folder)
            if not files:
                raise ValueError(f"{path}: not a datasets folder and no .parquet/.arrow file in it.")
            builder = TABLE_SUFFIXES[files[0].suffix]
            dataset = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        root = (folder if folder.is_dir() else folder.parent).resolve()
        self.convert = converter(options, root)
        self.convert.check_columns(list(dataset.column_names), self.name)
        self.dataset = _undecoded(dataset, self.convert.image_column)
        self.shuffle = options.shuffle

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int, rng: random.Random) -> RawSample:
        return self.convert(self.dataset[index], f"{self.name} row {index}")


class StreamingHubSource(Source):
    """A Hub dataset repo read with `streaming=True` (never fully downloaded)."""

    def __init__(self, repo_id: str, options: SourceOptions, converter: type[RowConverter] = RowConverter) -> None:
        self.name = f"hf:{repo_id}"
        self.repo_id = repo_id
        self.options = options
        self.convert = converter(options, None)

    def samples(self, shard: Shard, epoch: int, seed: int) -> Iterator[RawSample]:
        datasets = require("datasets", "data", DATASETS_PURPOSE)
        import torch.utils.data
        from datasets.distributed import split_dataset_by_node

        dataset = datasets.load_dataset(self.repo_id, split=self.options.split or "train", streaming=True)
        self.convert.check_columns(list(dataset.column_names or []), self.name)
        dataset = _undecoded(dataset, self.convert.image_column)
        worker = torch.utils.data.get_worker_info()
        workers = worker.num_workers if worker is not None else 1
        # datasets splits between the DataLoader workers itself; here only between ranks.
        dataset = split_dataset_by_node(dataset, rank=shard.index // workers, world_size=shard.count // workers)
        if self.options.shuffle:
            dataset = dataset.shuffle(seed=seed, buffer_size=self.options.shuffle_buffer)
            dataset.set_epoch(epoch)
        for index, row in enumerate(dataset):
            yield self.convert(row, f"{self.name} row {index}")
