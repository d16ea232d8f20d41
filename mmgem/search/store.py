"""The on-disk vector index: raw vectors and their items, appended crash-safely, plus one FAISS HNSW index per kind.

Layout of an index folder::

    INDEX/
        meta.json        format version, dimension, the model it was built with, the ANN parameters, region grids
        items.jsonl      one JSON object per vector (row id = line number): path, kind, box, caption, file facts
        vectors.f32      the L2-normalised vectors, float32, row-major [num_rows, dim]
        ann-<kind>.faiss FAISS `IndexIDMap2(IndexHNSWFlat)` over that kind's rows (ids = row ids)
        ann.json         how many rows each saved ANN file covers
        .lock            held (flock) by the one process that writes

Kinds: `image` (the whole image), `region` (a box of an image), `caption` (the text embedding of the caption the
model wrote for the image). `vectors.f32` and `items.jsonl` are the source of truth and are only appended to, in
whole batches of whole files: vectors first, then the batch's item lines in one write. Opening the folder cuts a
half-written tail (an interrupted run) back to the last complete file, so the index stays consistent. The ANN files
are a cache of those rows: rows they miss (a run stopped before saving them) are added when the folder is opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmgem.files import write_bytes_atomic

FORMAT_VERSION = 1
KINDS = ("image", "region", "caption")
# HNSW defaults: recall@10 against exact search >= 0.99 at 100k vectors (benchmarks/search.py measures it).
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 128
DEFAULT_EF_SEARCH = 128


@dataclass(frozen=True)
class Hit:
    """One search result: the item's row, its similarity (cosine) and its stored fields."""

    row: int
    score: float
    item: dict[str, Any]

    @property
    def path(self) -> str:
        return self.item["path"]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so a reader sees the old or the new file."""
    write_bytes_atomic(path, data, durable=True)


def _new_ann(dim: int, hnsw_m: int, ef_construction: int, ef_search: int, exact: bool) -> Any:
    import faiss

    if exact:
        base = faiss.IndexFlatIP(dim)
    else:
        base = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = ef_construction
        base.hnsw.efSearch = ef_search
    return faiss.IndexIDMap2(base)


class VectorStore:
    """An index folder opened for reading, or for appending with `writable=True` (one writer at a time)."""

    def __init__(self, folder: str | os.PathLike[str], writable: bool = False) -> None:
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            raise ValueError(f"`index` {self.folder} is not an mmgem index (no meta.json); see `mmgem index`.")
        self.writable = writable
        self._lock = None
        if writable:
            self._lock = open(self.folder / ".lock", "w")  # noqa: SIM115 - held for the store's lifetime
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise ValueError(f"`index` {self.folder} is being written by another process.") from None
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"`index` {self.folder} has format {self.meta.get('format_version')}; "
                             f"this mmgem reads format {FORMAT_VERSION}.")  # fmt: skip
        self.dim = int(self.meta["dim"])
        self.items = self._read_consistent_items()
        self.vectors = self._map_vectors()
        self.anns = {kind: self._load_ann(kind) for kind in KINDS}

    # ------------------------------------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls, folder: str | os.PathLike[str], dim: int, model: dict[str, Any], region_grids: Sequence[int] = (),
        exact: bool = False, hnsw_m: int = DEFAULT_HNSW_M, ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
    ) -> VectorStore:  # fmt: skip
        """A new, empty index folder opened for writing (the folder may exist but must not hold an index)."""
        folder = Path(folder)
        if (folder / "meta.json").exists():
            raise ValueError(f"`output` {folder} already holds an index.")
        folder.mkdir(parents=True, exist_ok=True)
        ann = {"library": "faiss", "type": "flat" if exact else "hnsw", "metric": "inner_product (cosine)"}
        if not exact:
            ann.update(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
        meta = {"format_version": FORMAT_VERSION, "dim": int(dim), "model": model, "ann": ann,
                "region_grids": [int(g) for g in region_grids]}  # fmt: skip
        for name in ("items.jsonl", "vectors.f32"):
            (folder / name).touch()
        _write_atomic(folder / "meta.json", json.dumps(meta, indent=2).encode())
        return cls(folder, writable=True)

    # ------------------------------------------------------------------------------------------------ recovery
    def _read_consistent_items(self) -> list[dict[str, Any]]:
        """The complete items; a torn tail (an interrupted append) is cut back to the last complete file."""
        items_path, vectors_path = self.folder / "items.jsonl", self.folder / "vectors.f32"
        items: list[dict[str, Any]] = []
        with open(items_path, "rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        num_vectors = os.path.getsize(vectors_path) // (4 * self.dim)
        items = items[:num_vectors]
        # A file's rows are appended together; drop the last file if only some of its rows made it.
        if items:
            last = items[-1]["path"]
            first_row = len(items)
            while first_row > 0 and items[first_row - 1]["path"] == last:
                first_row -= 1
            if len(items) - first_row != items[-1]["file_rows"]:
                items = items[:first_row]
        clean_items_bytes = sum(len(json.dumps(item).encode()) + 1 for item in items)
        if self.writable and (clean_items_bytes != os.path.getsize(items_path) or
                              num_vectors * 4 * self.dim != os.path.getsize(vectors_path) or
                              len(items) != num_vectors):  # fmt: skip
            with open(items_path, "r+b") as handle:
                handle.truncate(clean_items_bytes)
            with open(vectors_path, "r+b") as handle:
                handle.truncate(len(items) * 4 * self.dim)
        return items

    def _map_vectors(self) -> np.ndarray:
        if not self.items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.memmap(self.folder / "vectors.f32", dtype=np.float32, mode="r", shape=(len(self.items), self.dim))

    def _ann_counts(self) -> dict[str, int]:
        path = self.folder / "ann.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def _load_ann(self, kind: str) -> Any:
        """The kind's ANN, with the rows the saved file misses added (and rows past the items dropped)."""
        import faiss

        path, info = self.folder / f"ann-{kind}.faiss", self.meta["ann"]
        saved = self._ann_counts().get(kind, 0)
        rows = self.rows_of(kind)
        ann = None
        if path.is_file() and 0 < saved <= len(rows):
            ann = faiss.read_index(str(path))
            if ann.ntotal != saved or int(faiss.vector_to_array(ann.id_map)[-1]) != rows[saved - 1]:
                ann = None  # stale cache (not the rows we have): rebuild from the vectors
        if ann is None:
            ann, saved = _new_ann(self.dim, info.get("hnsw_m", DEFAULT_HNSW_M),
                                  info.get("ef_construction", DEFAULT_EF_CONSTRUCTION),
                                  info.get("ef_search", DEFAULT_EF_SEARCH), info["type"] == "flat"), 0  # fmt: skip
        if saved < len(rows):
            missing = rows[saved:]
            ann.add_with_ids(np.ascontiguousarray(self.vectors[missing]), missing)
        return ann

    # ------------------------------------------------------------------------------------------------ writing
    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def paths(self) -> set[str]:
        """The paths (or shard keys) with rows in the index."""
        return {item["path"] for item in self.items}

    def append(self, vectors: np.ndarray, items: Sequence[dict[str, Any]]) -> None:
        """Append rows (whole files only; each item has `path`, `kind`, `file_rows`) to the files and the ANNs."""
        if not self.writable:
            raise RuntimeError("this VectorStore was opened read-only")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [rows, dim]
        if vectors.shape != (len(items), self.dim):
            raise ValueError(f"`vectors` must be [{len(items)}, {self.dim}]; got {list(vectors.shape)}.")
        if not len(items):
            return
        start = len(self.items)
        # Vectors first: rows without items are cut on open; items never point past the vectors.
        for name, data in (("vectors.f32", vectors.tobytes()),
                           ("items.jsonl", b"".join(json.dumps(item).encode() + b"\n" for item in items))):  # fmt: skip
            with open(self.folder / name, "ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        self.items.extend(items)
        self.vectors = self._map_vectors()
        for kind in KINDS:
            rows = np.array([start + i for i, item in enumerate(items) if item["kind"] == kind], dtype=np.int64)
            if len(rows):
                self.anns[kind].add_with_ids(vectors[rows - start], rows)

    def save_ann(self) -> None:
        """Write the ANN files (atomically each; `ann.json` last, so a count never exceeds its file)."""
        import faiss

        counts = {}
        for kind, ann in self.anns.items():
            if ann.ntotal:
                _write_atomic(self.folder / f"ann-{kind}.faiss", faiss.serialize_index(ann).tobytes())
            counts[kind] = int(ann.ntotal)
        _write_atomic(self.folder / "ann.json", json.dumps(counts).encode())

    # ------------------------------------------------------------------------------------------------ reading
    def rows_of(self, kind: str) -> np.ndarray:
        """The row ids of one kind, ascending."""
        return np.array([i for i, item in enumerate(self.items) if item["kind"] == kind], dtype=np.int64)

    def count(self, kind: str | None = None) -> int:
        return len(self.items) if kind is None else int(self.anns[kind].ntotal)

    def search(self, queries: np.ndarray, kind: str, k: int, exact: bool = False) -> list[list[Hit]]:
        """The `k` nearest rows of `kind` for each query [Q, dim] (unit vectors), best first.

        `exact=True` scores every row (a matmul over `vectors.f32`) instead of asking the ANN.
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # [Q, dim]
        if queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have {queries.shape[1]} dimensions; the index has {self.dim}.")
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}; got {kind!r}.")
        if self.count(kind) == 0:
            return [[] for _ in queries]
        k = min(k, self.count(kind))
        if exact:
            rows = self.rows_of(kind)
            scores = queries @ np.asarray(self.vectors[rows]).T  # [Q, rows]
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return [[Hit(int(rows[j]), float(s[j]), self.items[rows[j]]) for j in o] for s, o in zip(scores, order)]
        scores, ids = self.anns[kind].search(queries, k)
        return [[Hit(int(i), float(s), self.items[int(i)]) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]  # fmt: skip


@contextlib.contextmanager
def faiss_threads(count: int = 1) -> Iterator[None]:
    """Run FAISS on `count` OpenMP threads inside the block.

    FAISS's and torch's OpenMP thread pools busy-wait for each other when FAISS calls interleave with model work:
    measured 10x slower indexing on 2 cores. One FAISS thread costs nothing for batch-sized adds and single queries.
    """
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


@contextlib.contextmanager
def open_store(folder: str | os.PathLike[str], writable: bool = False) -> Iterator[VectorStore]:
    """`VectorStore(folder, writable)` as a context manager that releases the write lock."""
    store = VectorStore(folder, writable=writable)
    try:
        yield store
    finally:
        store.close()


def group_by_path(hits: Iterable[Hit], k: int) -> list[Hit]:
    """The best hit per path, best first, at most `k` (a path may match through its image, caption and regions)."""
    best: dict[str, Hit] = {}
    for hit in hits:
        if hit.path not in best or hit.score > best[hit.path].score:
            best[hit.path] = hit
    return sorted(best.values(), key=lambda h: -h.score)[:k]
