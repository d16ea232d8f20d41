"""Which format a `--data` source is in, and the :class:`~mmgem.data.formats.Source` that reads it.

Detection looks at the path and, for JSON, at its structure; it refuses to guess when two formats fit (pass
`--data-format`). Names: see :data:`FORMATS`.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmgem.data.formats import (
    Source,
    SourceOptions,
    coco,
    conversations,
    hf,
    local,
    read_json,
    refcoco,
    shards,
    visual_genome,
)
from mmgem.data.formats.hf import is_dataset_folder, table_files
from mmgem.data.records import load_imagefolder_records, load_jsonl_records

FORMATS = (
    "webdataset",
    "grit",
    "hf",
    "llava",
    "coco",
    "karpathy",
    "visual-genome",
    "refcoco",
    "jsonl",
    "imagefolder",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_shard_pattern(spec: str) -> bool:
    return spec.endswith(".tar") or spec.endswith(".tar}") or (".tar" in spec and "{" in spec)


def json_format(path: str) -> str | None:
    """The format of a JSON annotation file from its structure, or None."""
    data = read_json(path)
    if isinstance(data, list):
        first = next((e for e in data if isinstance(e, dict)), None)
        if first is None:
            return None
        if "conversations" in first:
            return "llava"
        if "regions" in first and ("id" in first or "image_id" in first):
            return "visual-genome"
        return None
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        first = next((e for e in data["images"] if isinstance(e, dict)), {})
        if "sentences" in first:
            return "karpathy"
        annotations = data.get("annotations") or []
        if annotations and isinstance(annotations[0], dict) and "caption" in annotations[0]:
            return "coco"
    return None


def detect_format(spec: str) -> str:
    """The format of `spec` (a path, shard pattern or Hub id); a ValueError says why it cannot tell."""
    path = Path(spec)
    if _is_shard_pattern(spec):
        return "webdataset"
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return "jsonl"
        if suffix == ".p" or suffix == ".pkl":
            return "refcoco"
        if suffix in (".parquet", ".arrow"):
            return _table_format(path)
        if suffix == ".json":
            found = json_format(spec)
            if found:
                return found
            raise ValueError(
                f"`--data` {spec}: cannot tell the format of this JSON; pass `--data-format` (one of {FORMATS})."
            )
    elif path.is_dir():
        if (path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file():
            return "imagefolder"
        if is_dataset_folder(path):
            return "hf"
        if any(path.glob("refs(*).p")):
            return "refcoco"
        if any(path.glob("*.tar")):
            return "webdataset"
        if table_files(path):
            return _table_format(table_files(path)[0])
    elif _HUB_ID.match(spec):
        return "hf"
    else:
        raise ValueError(f"`--data` {spec} does not exist (expected a file, folder, shard pattern or Hub id).")
    raise ValueError(f"`--data` {spec}: cannot tell its format; pass `--data-format` (one of {FORMATS}).")


def _table_format(path: Path) -> str:
    """RefCOCO's parquet layout (bbox + answer columns) or a generic table."""
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        names = set(pq.read_schema(path).names)
        if {"bbox", "answer"} <= names:
            return "refcoco"
    return "hf"


def _shard_urls(spec: str) -> str | list[str]:
    path = Path(spec)
    if path.is_dir():
        return [str(p) for p in sorted(path.glob("*.tar"))]
    return spec


def open_source(spec: str, data_format: str | None, options: SourceOptions, on_error: str = "fail") -> Source:
    """The reader of one `--data` source in `data_format` (None: detected)."""
    name = data_format or detect_format(spec)
    if name not in FORMATS:
        raise ValueError(f"`--data-format` must be one of {FORMATS}; got {name!r}.")
    if name in ("webdataset", "grit"):
        return shards.WebDatasetSource(_shard_urls(spec), options, on_error)
    if name == "hf":
        if Path(spec).exists():
            return hf.ArrowSource(spec, options)
        return hf.StreamingHubSource(spec, options)
    if name == "refcoco":
        if Path(spec).suffix in (".parquet", ".arrow") or (Path(spec).is_dir() and hf.table_files(Path(spec))):
            return hf.ArrowSource(spec, options, refcoco.RefcocoRowConverter)
        return refcoco.RefcocoSource(spec, options)
    if name == "jsonl":
        records = load_jsonl_records(spec, on_error=on_error, allow_outside_data_root=options.allow_outside_data_root)
        return local.RecordListSource(f"jsonl:{spec}", records, options.shuffle)
    if name == "imagefolder":
        records = load_imagefolder_records(
            spec,
            split=options.split or "train",
            on_error=on_error,
            allow_outside_data_root=options.allow_outside_data_root,
        )
        return local.RecordListSource(f"imagefolder:{spec}", records, options.shuffle)
    if not Path(spec).is_file():
        raise ValueError(f"`--data` {spec}: the {name} format reads a JSON file; it does not exist.")
    data = read_json(str(Path(spec)))
    if name == "llava":
        return conversations.ConversationSource(spec, options, data)
    if name == "coco":
        return coco.coco_source(spec, options, data)
    if name == "karpathy":
        return coco.karpathy_source(spec, options, data)
    return visual_genome.VisualGenomeSource(spec, options, data)
