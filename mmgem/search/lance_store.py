"""LanceDB behind search: the same index folder and queries as the FAISS store, with the rows in a LanceDB table.

Layout::

    INDEX/
        meta.json      as the FAISS store's (format version, dimension, model, region grids); `ann.library` is
                       "lancedb" (that is what `open_index` dispatches on)
        lancedb/       a LanceDB database (Lance files) with one table `items`: row, kind, path, vector, and the
                       item's other fields as JSON

`LanceStore` answers what `ImageSearch` asks a store (`meta`, `items`, `vectors`, `count`, `search`), so
`mmgem search`, the app and `ImageSearch` use it unchanged. Build one from a FAISS index folder (`export_store`, or
`mmgem index --backend lancedb`) or from `mmgem embed`'s output without embedding again
(`mmgem.scale.lance.import_embeddings`, `mmgem embed --lancedb INDEX`). The `lancedb/` folder is LanceDB's
own format: the same table opens from object storage (`lancedb.connect("s3://...")`) or LanceDB's server/cloud
after copying it there.

Cosine similarity on unit vectors; below `ANN_MIN_ROWS` rows a query scans every row (exact), above it an
IVF-HNSW-SQ index is built and queried with `refine_factor` re-ranking on the full vectors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmgem.files import write_bytes_atomic
from mmgem.optional import require
from mmgem.search.store import FORMAT_VERSION, KINDS, Hit, VectorStore

TABLE = "items"
DATABASE = "lancedb"
ANN_MIN_ROWS = 5000  # smaller tables are scanned exactly (an IVF index needs enough rows to train its partitions)
REFINE_FACTOR = 4  # re-rank k * this ANN candidates on the full vectors
NPROBES = 20
BASE_FIELDS = ("row", "kind", "path", "vector")


def is_lance_index(folder: str | os.PathLike[str]) -> bool:
    meta = Path(folder) / "meta.json"
    if not meta.is_file():
        return False
    return json.loads(meta.read_text(encoding="utf-8")).get("ann", {}).get("library") == "lancedb"


def open_index(folder: str | os.PathLike[str]) -> Any:
    """The store of an index folder, read-only: `LanceStore` for a LanceDB index, else the FAISS `VectorStore`."""
    return LanceStore(folder) if is_lance_index(folder) else VectorStore(folder)


def write_table(folder: Path, vectors: np.ndarray, items: Sequence[dict[str, Any]], build_ann: bool) -> None:
    import pyarrow as pa

    lancedb = require("lancedb", "scale", "The LanceDB search backend")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    extra = [{k: v for k, v in item.items() if k not in BASE_FIELDS} for item in items]
    table = pa.table(
        {
            "row": pa.array(np.arange(len(items)), pa.int64()),
            "kind": [item["kind"] for item in items],
            "path": [item["path"] for item in items],
            "fields": [json.dumps(e) for e in extra],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        }
    )
    db = lancedb.connect(str(folder / DATABASE))
    lance_table = db.create_table(TABLE, table, mode="overwrite")
    if build_ann and len(items) >= ANN_MIN_ROWS:
        lance_table.create_index(metric="cosine", vector_column_name="vector", index_type="IVF_HNSW_SQ")
    lance_table.create_scalar_index("kind", index_type="BITMAP")


def write_meta(folder: Path, dim: int, model: dict[str, Any], region_grids: Sequence[int], exact: bool) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "dim": int(dim),
        "model": model,
        "ann": {
            "library": "lancedb",
            "type": "flat" if exact else "ivf_hnsw_sq",
            "metric": "cosine",
            "min_rows": ANN_MIN_ROWS,
            "refine_factor": REFINE_FACTOR,
            "nprobes": NPROBES,
        },
        "region_grids": [int(g) for g in region_grids],
    }
    write_bytes_atomic(folder / "meta.json", json.dumps(meta, indent=2).encode())


def new_folder(output: Path, keep: Sequence[str] = ()) -> None:
    """Make `output` (new, empty, or a LanceDB index being rebuilt: only `keep` entries, meta.json and the
    database besides); anything else in it is refused."""
    if output.exists() and not output.is_dir():
        raise ValueError(f"`output` {output} exists and is not a folder.")
    allowed = set(keep) | ({"meta.json", DATABASE} if is_lance_index(output) else set())
    if output.exists() and any(entry.name not in allowed for entry in output.iterdir()):
        raise ValueError(f"`output` {output} exists and is not empty; give a new or empty folder.")
    output.mkdir(parents=True, exist_ok=True)


def export_store(
    index: str | os.PathLike[str], output: str | os.PathLike[str], exact: bool = False, keep: Sequence[str] = ()
) -> Path:
    """A LanceDB index folder `output` holding the rows of the FAISS index folder `index` (no embedding)."""
    output = Path(output)
    with_store = VectorStore(index)
    try:
        new_folder(output, keep)
        write_table(output, np.asarray(with_store.vectors), with_store.items, build_ann=not exact)
        write_meta(output, with_store.dim, with_store.meta["model"], with_store.meta["region_grids"], exact)
    finally:
        with_store.close()
    return output


class LanceStore:
    """A LanceDB index folder opened for reading, with `VectorStore`'s reading interface."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        lancedb = require("lancedb", "scale", "The LanceDB search backend")
        self.folder = Path(folder)
        if not is_lance_index(self.folder):
            raise ValueError(f"`index` {self.folder} is not a LanceDB mmgem index (meta.json ann.library).")
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.dim = int(self.meta["dim"])
        self.table = lancedb.connect(str(self.folder / DATABASE)).open_table(TABLE)
        columns = self.table.to_arrow().select(["row", "kind", "path", "fields"]).to_pylist()
        columns.sort(key=lambda r: r["row"])
        self.items = [{"kind": r["kind"], "path": r["path"], **json.loads(r["fields"])} for r in columns]
        self._counts = {kind: sum(item["kind"] == kind for item in self.items) for kind in KINDS}
        self._vectors: np.ndarray | None = None
        self.exact = self.meta["ann"]["type"] == "flat" or len(self.items) < ANN_MIN_ROWS

    @property
    def vectors(self) -> np.ndarray:
        """All vectors [rows, dim] in row order (read on first use: the fused caption scores need them)."""
        if self._vectors is None:
            table = self.table.to_arrow().select(["row", "vector"]).sort_by("row")
            self._vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
        return self._vectors

    def close(self) -> None:
        """Nothing is held open (the same call as `VectorStore.close`)."""

    def __enter__(self) -> LanceStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def count(self, kind: str | None = None) -> int:
        return len(self.items) if kind is None else self._counts.get(kind, 0)

    def search(self, queries: np.ndarray, kind: str, k: int, exact: bool = False) -> list[list[Hit]]:
        """The `k` nearest rows of `kind` for each query [Q, dim] (unit vectors), best first (cosine)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have {queries.shape[1]} dimensions; the index has {self.dim}.")
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}; got {kind!r}.")
        if self.count(kind) == 0:
            return [[] for _ in queries]
        k = min(k, self.count(kind))
        return [self._one(query, kind, k, exact or self.exact) for query in queries]

    def _one(self, query: np.ndarray, kind: str, k: int, exact: bool) -> list[Hit]:
        search = self.table.search(query, vector_column_name="vector").distance_type("cosine")
        search = search.where(f"kind = '{kind}'", prefilter=True).limit(k).select(["row"])
        if exact:
            search = search.bypass_vector_index()
        else:
            search = search.nprobes(NPROBES).refine_factor(REFINE_FACTOR)
        result = search.to_arrow()
        rows, distances = result.column("row").to_pylist(), result.column("_distance").to_pylist()
        return [Hit(int(r), 1.0 - float(d), self.items[int(r)]) for r, d in zip(rows, distances)]
