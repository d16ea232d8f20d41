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
are a cache of those rows: rows they miss (a run stopped before saving them) are added when the folder is opened, and
a damaged or truncated cache is rebuilt from the vectors.

Each item carries its `row` (the line of `vectors.f32` it describes), so lines removed or reordered by hand are
detected. Damage that no crash can leave (a line that is not JSON or not UTF-8, a row out of place, an image with only
some of its rows, items past the end of `vectors.f32`) is reported by line: a reader refuses the index, and a writer
opened with `repair=True` (`mmgem index`) drops the damaged images' rows, says which, and rewrites the two files
(through `*.repair` files renamed into place, vectors first, which an interrupted repair finishes on the next open).

A received index folder is not trusted: the store never writes through a symbolic link or into something that is not
a regular file (a link in an index could point at any file of the user's), and never unpickles anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmgem.errors import MMGEMUserError
from mmgem.files import write_bytes_atomic

FORMAT_VERSION = 1
KINDS = ("image", "region", "caption")
# HNSW defaults: recall@10 against exact search >= 0.99 at 100k vectors (benchmarks/search.py measures it).
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 128
DEFAULT_EF_SEARCH = 128
# The files a writer creates, appends to or replaces; each must be a regular file, never a symbolic link.
DATA_FILES = ("items.jsonl", "vectors.f32")
REPAIR_SUFFIX = ".repair"
MAX_PROBLEMS_SHOWN = 3


class IndexDamagedError(MMGEMUserError):
    """An index folder whose files no interrupted run could have left (see the module docstring)."""


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
    """Write `data` to `path` through a temporary file and a rename, so a reader sees the old or the new file.
    The rename replaces a symbolic link at `path` itself; nothing is written where it pointed."""
    write_bytes_atomic(path, data, durable=True)


def _refuse_link(path: Path, argument: str) -> None:
    """Raise unless `path` is absent or a regular file (a link or a FIFO in a received index is refused)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise MMGEMUserError(
            f"`{argument}` {path.parent}: {path.name} is a symbolic link (to {os.readlink(path)!r}); an index never "
            "writes through links, which could point at any of your files. Replace the link with a copy of the file, "
            "or rebuild the index in a new folder."
        )
    if not stat.S_ISREG(info.st_mode):
        raise MMGEMUserError(f"`{argument}` {path.parent}: {path.name} is not a regular file; rebuild the index.")


def _open_fd(path: Path, flags: int, argument: str) -> int:
    """`os.open` that refuses symbolic links atomically (O_NOFOLLOW), after the clearer lstat check."""
    _refuse_link(path, argument)
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:  # became a link after the check
            _refuse_link(path, argument)
        raise


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _new_ann(dim: int, hnsw_m: int, ef_construction: int, ef_search: int, exact: bool) -> Any:
    import faiss

    if exact:
        base = faiss.IndexFlatIP(dim)
    else:
        base = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = ef_construction
        base.hnsw.efSearch = ef_search
    return faiss.IndexIDMap2(base)


def _item_problem(item: Any) -> str | None:
    """Why a parsed line is not an item (None if it is one)."""
    if not isinstance(item, dict):
        return "not a JSON object"
    if not isinstance(item.get("path"), str):
        return "no `path` string"
    if item.get("kind") not in KINDS:
        return f"`kind` {item.get('kind')!r} is not one of {KINDS}"
    if not isinstance(item.get("file_rows"), int) or item["file_rows"] < 1:
        return "no positive `file_rows`"
    if "row" in item and (not isinstance(item["row"], int) or item["row"] < 0):
        return f"`row` {item['row']!r} is not a row number"
    return None


@dataclass
class _Scan:
    """What `items.jsonl` and `vectors.f32` hold: the rows that can be kept and what is wrong with the others."""

    items: list[dict[str, Any]]  # the kept items, in order
    rows: list[int]  # the vectors.f32 row of each kept item
    problems: list[str]  # damage (by line) that no interrupted run leaves
    num_vectors: int

    @property
    def contiguous(self) -> bool:
        return self.rows == list(range(len(self.rows)))


class VectorStore:
    """An index folder opened for reading, or for appending with `writable=True` (one writer at a time).

    `repair=True` (with `writable`) rewrites a damaged index without its damaged images' rows (`self.repairs` lists
    what was dropped, by line); without it a damaged index raises `IndexDamagedError`. `argument` is the name that
    errors give the folder (e.g. "output").
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        writable: bool = False,
        repair: bool = False,
        argument: str = "index",
        _lock_fd: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.argument = argument
        self.repairs: list[str] = []
        self.rebuilt_anns: list[str] = []
        if not (self.folder / "meta.json").is_file():
            raise MMGEMUserError(f"`{argument}` {self.folder} is not an mmgem index (no meta.json); see `mmgem index`.")
        self.writable = writable
        self._lock: int | None = None
        if writable:
            self._lock = _lock_fd if _lock_fd is not None else self._acquire_lock(self.folder, argument)
        try:
            self.meta = self._read_meta()
            self.dim = int(self.meta["dim"])
            if writable:
                self._check_no_links()
                self._finish_interrupted_repair()
                self._remove_stale_temporaries()
            for name in DATA_FILES:
                if not (self.folder / name).is_file():
                    raise IndexDamagedError(
                        f"`{argument}` {self.folder} has no {name} (or it is not a file); "
                        "rebuild the index in a new folder."
                    )
            self.items = self._read_consistent_items(repair)
            self.vectors = self._map_vectors()
            self.anns = {kind: self._load_ann(kind) for kind in KINDS}
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _acquire_lock(folder: Path, argument: str) -> int:
        fd = _open_fd(folder / ".lock", os.O_WRONLY | os.O_CREAT, argument)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MMGEMUserError(
                f"`{argument}` {folder} is being written by another process (another `mmgem index`); wait for it to "
                "finish, or write to another folder."
            ) from None
        return fd

    def _read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
                raise ValueError("not an object with a `model`")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise IndexDamagedError(
                f"`{self.argument}` {self.folder}: meta.json is unreadable ({error}); rebuild the index."
            ) from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise MMGEMUserError(
                f"`{self.argument}` {self.folder} has format {meta.get('format_version')}; "
                f"this mmgem reads format {FORMAT_VERSION}."
            )
        if not isinstance(meta.get("dim"), int) or meta["dim"] < 1 or not isinstance(meta.get("ann"), dict):
            raise IndexDamagedError(f"`{self.argument}` {self.folder}: meta.json has no valid `dim` / `ann`.")
        return meta

    def _check_no_links(self) -> None:
        names = [*DATA_FILES, *(n + REPAIR_SUFFIX for n in DATA_FILES), "ann.json", "meta.json"]
        names += [f"ann-{kind}.faiss" for kind in KINDS]
        for name in names:
            _refuse_link(self.folder / name, self.argument)

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of atomic writes a killed writer left (we hold the lock: no writer is making them now)."""
        for pattern in (".ann-*.tmp", ".ann.json.*.tmp", ".meta.json.*.tmp"):
            for leftover in self.folder.glob(pattern):
                leftover.unlink(missing_ok=True)  # unlinks a link itself, never its target

    # ------------------------------------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        folder: str | os.PathLike[str],
        dim: int,
        model: dict[str, Any],
        region_grids: Sequence[int] = (),
        exact: bool = False,
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
        argument: str = "output",
    ) -> VectorStore:
        """A new, empty index folder opened for writing.

        The folder may exist: empty, or holding what a create killed before writing meta.json left (empty data
        files, the lock); anything else is refused.
        """
        folder = Path(folder)
        if (folder / "meta.json").exists():
            raise MMGEMUserError(f"`{argument}` {folder} already holds an index.")
        if folder.exists() and not folder.is_dir():
            raise MMGEMUserError(f"`{argument}` {folder} is a file; give a new or empty folder.")
        folder.mkdir(parents=True, exist_ok=True)
        lock = cls._acquire_lock(folder, argument)
        try:
            if (folder / "meta.json").exists():  # another process created it while we waited for the folder
                raise MMGEMUserError(f"`{argument}` {folder} already holds an index.")
            cls.check_creatable(folder, argument)
            for name in DATA_FILES:
                os.close(_open_fd(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, argument))
            for leftover in folder.glob(".meta.json.*"):
                leftover.unlink(missing_ok=True)
            ann = {"library": "faiss", "type": "flat" if exact else "hnsw", "metric": "inner_product (cosine)"}
            if not exact:
                ann.update(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
            meta = {
                "format_version": FORMAT_VERSION,
                "dim": int(dim),
                "model": model,
                "ann": ann,
                "region_grids": [int(g) for g in region_grids],
            }
            _write_atomic(folder / "meta.json", json.dumps(meta, indent=2).encode())
        except BaseException:
            os.close(lock)
            raise
        return cls(folder, writable=True, argument=argument, _lock_fd=lock)

    @staticmethod
    def check_creatable(folder: Path, argument: str = "output") -> None:
        """Raise unless a new index can be created in `folder`: absent, empty, or what a killed create left."""
        folder = Path(folder)
        if not folder.exists():
            return
        if not folder.is_dir():
            raise MMGEMUserError(f"`{argument}` {folder} is a file; give a new or empty folder.")
        leftovers = [p for p in folder.iterdir() if p.name != ".lock" and not p.name.startswith(".meta.json.")]
        foreign = [
            p.name
            for p in leftovers
            if p.name not in DATA_FILES or p.is_symlink() or not p.is_file() or p.stat().st_size
        ]
        if foreign:
            raise MMGEMUserError(
                f"`{argument}` {folder} exists and is not an mmgem index (it holds "
                f"{', '.join(sorted(foreign)[:5])}); give a new or empty folder."
            )

    @classmethod
    def check_writable(cls, folder: Path, argument: str = "output") -> dict[str, Any]:
        """The meta of the index in `folder` if a writer could open it now (no links, no other writer), else a
        one-line error; quick (no item is read), for checks before a model loads."""
        folder = Path(folder)
        for name in (".lock", *DATA_FILES, "ann.json", *(f"ann-{kind}.faiss" for kind in KINDS)):
            _refuse_link(folder / name, argument)
        os.close(cls._acquire_lock(folder, argument))
        probe = cls.__new__(cls)
        probe.folder, probe.argument = folder, argument
        return probe._read_meta()

    # ------------------------------------------------------------------------------------------------ recovery
    def _finish_interrupted_repair(self) -> None:
        """A repair renames `vectors.f32.repair` then `items.jsonl.repair` into place: finish one killed between the
        two renames; drop the files of one killed before them (the old pair is then intact)."""
        items_new, vectors_new = (self.folder / (n + REPAIR_SUFFIX) for n in DATA_FILES)
        if vectors_new.exists():
            items_new.unlink(missing_ok=True)
            vectors_new.unlink()
        elif items_new.exists():
            os.replace(items_new, self.folder / "items.jsonl")

    def _scan(self) -> _Scan:
        """Parse items.jsonl line by line against vectors.f32 (see the module docstring for what is damage)."""
        items_path = self.folder / "items.jsonl"
        if (
            not self.writable
            and (self.folder / ("items.jsonl" + REPAIR_SUFFIX)).exists()
            and not (self.folder / ("vectors.f32" + REPAIR_SUFFIX)).exists()
        ):
            items_path = self.folder / ("items.jsonl" + REPAIR_SUFFIX)  # a repair killed between its two renames
        data = items_path.read_bytes()
        num_vectors = os.path.getsize(self.folder / "vectors.f32") // (4 * self.dim)
        lines = data.split(b"\n")
        lines.pop()  # b"" after the last newline, or a line an interrupted append left unfinished
        problems: list[str] = []
        parsed: list[tuple[int, dict[str, Any], int]] = []  # (line number, item, row)
        previous_row, bad_lines = -1, set()
        for number, line in enumerate(lines, 1):
            try:
                item = json.loads(line.decode("utf-8"))
                reason = _item_problem(item)
            except UnicodeDecodeError as error:
                reason = f"invalid UTF-8 at byte {error.start}"
            except ValueError as error:
                reason = f"not valid JSON ({error})"
            except RecursionError:
                reason = "JSON nested too deeply"
            if reason is None:
                row = item.get("row", number - 1)  # indexes written before rows were stored: the line number
                if row <= previous_row:
                    reason = f"row {row} comes after row {previous_row} (lines reordered or duplicated)"
                elif row >= num_vectors:
                    reason = f"row {row} is past the end of vectors.f32 ({num_vectors} rows: truncated?)"
            if reason is not None:
                problems.append(f"items.jsonl line {number}: {reason}")
                bad_lines.add(number)
                continue
            previous_row = row
            parsed.append((number, item, row))
        items, rows = [], []
        start = 0
        while start < len(parsed):  # whole files only: a file's rows are consecutive lines and rows
            path, file_rows = parsed[start][1]["path"], parsed[start][1]["file_rows"]
            end = start + 1
            while end < len(parsed) and parsed[end][1]["path"] == path and end - start < file_rows:
                end += 1
            group = parsed[start:end]
            whole = len(group) == file_rows and all(
                b[0] == a[0] + 1 and b[2] == a[2] + 1 for a, b in zip(group, group[1:])
            )
            if whole:
                items += [item for _, item, _ in group]
                rows += [row for _, _, row in group]
            elif end < len(parsed) or max(bad_lines, default=-1) > group[0][0]:
                # Dropped whole; said once: a damaged line next to the group already explains its missing row.
                if not any(n in bad_lines for n in range(group[0][0] - file_rows, group[-1][0] + file_rows + 1)):
                    problems.append(
                        f"items.jsonl lines {group[0][0]}-{group[-1][0]}: {len(group)} of the "
                        f"{file_rows} rows of {path} (lines removed?)"
                    )
            # else: the last file of an interrupted append, cut like the torn line after it
            start = end
        return _Scan(items, rows, problems, num_vectors)

    def _read_consistent_items(self, repair: bool) -> list[dict[str, Any]]:
        """The complete items; a torn tail (an interrupted append) is cut back to the last complete file; damage is
        refused, or with `repair` rewritten away."""
        scan = self._scan()
        if scan.problems or not scan.contiguous:
            if not (self.writable and repair):
                shown = "; ".join(scan.problems[:MAX_PROBLEMS_SHOWN]) or "rows out of place"
                more = len(scan.problems) - MAX_PROBLEMS_SHOWN
                raise IndexDamagedError(
                    f"`{self.argument}` {self.folder} is damaged: {shown}{f' (and {more} more)' if more > 0 else ''}. "
                    "Run `mmgem index` on it again to repair it (the damaged images' rows are dropped and "
                    "re-embedded), or rebuild it in a new folder."
                )
            self.repairs = scan.problems or ["rows out of place"]
            return self._rewrite(scan.items, scan.rows, scan.num_vectors)
        items = scan.items
        row_bytes = 4 * self.dim
        clean_items_bytes = sum(len(json.dumps(item).encode()) + 1 for item in items)
        sizes = (os.path.getsize(self.folder / "items.jsonl"), os.path.getsize(self.folder / "vectors.f32"))
        if self.writable and sizes != (clean_items_bytes, len(items) * row_bytes):
            for name, size in (("items.jsonl", clean_items_bytes), ("vectors.f32", len(items) * row_bytes)):
                fd = _open_fd(self.folder / name, os.O_RDWR, self.argument)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        return items

    def _rewrite(self, items: list[dict[str, Any]], rows: list[int], num_vectors: int) -> list[dict[str, Any]]:
        """Replace the two files by `items` (renumbered) and their vectors `rows`; the ANN cache is dropped first."""
        vectors = b""
        if rows:
            source = np.memmap(self.folder / "vectors.f32", dtype=np.float32, mode="r", shape=(num_vectors, self.dim))
            vectors = np.ascontiguousarray(source[rows]).tobytes()
            del source
        items = [{**item, "row": i} for i, item in enumerate(items)]
        payloads = {
            "vectors.f32": vectors,
            "items.jsonl": b"".join(json.dumps(item).encode() + b"\n" for item in items),
        }
        for name, data in payloads.items():
            path = self.folder / (name + REPAIR_SUFFIX)
            path.unlink(missing_ok=True)
            fd = _open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.argument)
            try:
                _write_fd(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        # The cache describes the old rows: forget it before the rows change (it is rebuilt below).
        (self.folder / "ann.json").unlink(missing_ok=True)
        for name in ("vectors.f32", "items.jsonl"):  # this order: see `_finish_interrupted_repair`
            os.replace(self.folder / (name + REPAIR_SUFFIX), self.folder / name)
        return items

    def _map_vectors(self) -> np.ndarray:
        if not self.items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.memmap(self.folder / "vectors.f32", dtype=np.float32, mode="r", shape=(len(self.items), self.dim))

    def _ann_counts(self) -> dict[str, int]:
        """How many rows each saved ANN file covers; {} (rebuild everything) when ann.json is unreadable."""
        path = self.folder / "ann.json"
        try:
            counts = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, UnicodeDecodeError, ValueError):
            counts = None
        if not isinstance(counts, dict) or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
            if "ann.json" not in self.rebuilt_anns:
                self.rebuilt_anns.append("ann.json")
            return {}
        return counts

    def _read_saved_ann(self, path: Path, saved: int, rows: np.ndarray) -> Any:
        """The saved ANN if it is readable and covers exactly the first `saved` of `rows`, else None."""
        import faiss

        try:
            ann = faiss.read_index(str(path))
            ids = faiss.vector_to_array(ann.id_map)
        except Exception:  # noqa: BLE001 - a truncated or damaged cache: FAISS raises RuntimeError and others
            self.rebuilt_anns.append(path.name)
            return None
        if ann.d != self.dim or ann.ntotal != saved or len(ids) != saved or int(ids[-1]) != rows[saved - 1]:
            self.rebuilt_anns.append(path.name)  # stale (not the rows we have): rebuilt from the vectors
            return None
        return ann

    def _load_ann(self, kind: str) -> Any:
        """The kind's ANN, with the rows the saved file misses added (and rows past the items dropped)."""
        path, info = self.folder / f"ann-{kind}.faiss", self.meta["ann"]
        saved = self._ann_counts().get(kind, 0)
        rows = self.rows_of(kind)
        ann = None
        if path.is_file() and 0 < saved <= len(rows):
            ann = self._read_saved_ann(path, saved, rows)
        if ann is None:
            ann, saved = (
                _new_ann(
                    self.dim,
                    info.get("hnsw_m", DEFAULT_HNSW_M),
                    info.get("ef_construction", DEFAULT_EF_CONSTRUCTION),
                    info.get("ef_search", DEFAULT_EF_SEARCH),
                    info.get("type") == "flat",
                ),
                0,
            )
        if saved < len(rows):
            missing = rows[saved:]
            ann.add_with_ids(np.ascontiguousarray(self.vectors[missing]), missing)
        return ann

    # ------------------------------------------------------------------------------------------------ writing
    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
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
        items = [{**item, "row": start + i} for i, item in enumerate(items)]
        # Vectors first: rows without items are cut on open; items never point past the vectors.
        for name, data in (
            ("vectors.f32", vectors.tobytes()),
            ("items.jsonl", b"".join(json.dumps(item).encode() + b"\n" for item in items)),
        ):
            fd = _open_fd(self.folder / name, os.O_WRONLY | os.O_APPEND, self.argument)
            try:
                _write_fd(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.items.extend(items)
        self.vectors = self._map_vectors()
        for kind in KINDS:
            rows = np.array([start + i for i, item in enumerate(items) if item["kind"] == kind], dtype=np.int64)
            if len(rows):
                self.anns[kind].add_with_ids(vectors[rows - start], rows)

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Drop every row of `paths` (e.g. images edited since they were indexed); returns the rows removed. The
        files are rewritten as a repair is, and the ANNs rebuilt from the remaining vectors."""
        if not self.writable:
            raise RuntimeError("this VectorStore was opened read-only")
        paths = set(paths)
        keep = [row for row, item in enumerate(self.items) if item["path"] not in paths]
        removed = len(self.items) - len(keep)
        if removed:
            self.vectors = None  # release the map of the file about to be replaced
            self.items = self._rewrite([self.items[row] for row in keep], keep, len(self.items))
            self.vectors = self._map_vectors()
            self.anns = {kind: self._load_ann(kind) for kind in KINDS}
        return removed

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
        return [
            [Hit(int(i), float(s), self.items[int(i)]) for s, i in zip(srow, irow) if i >= 0]
            for srow, irow in zip(scores, ids)
        ]


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


def group_by_path(hits: Iterable[Hit], k: int) -> list[Hit]:
    """The best hit per path, best first, at most `k` (a path may match through its image, caption and regions)."""
    best: dict[str, Hit] = {}
    for hit in hits:
        if hit.path not in best or hit.score > best[hit.path].score:
            best[hit.path] = hit
    return sorted(best.values(), key=lambda h: -h.score)[:k]
