"""A received or damaged index folder: the store never writes through a symbolic link, reports damage to
items.jsonl / vectors.f32 by line (a reader refuses, `mmgem index` repairs and says what it dropped), rebuilds a
damaged ANN cache, finishes an interrupted repair, and cleans what killed writers left. No model: vectors are random.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the index needs the search extra (pip install 'mmgem[search]')")

from mmgem.errors import MMGEMUserError  # noqa: E402
from mmgem.search.store import IndexDamagedError, VectorStore  # noqa: E402

pytestmark = pytest.mark.fast
DIM, FILES, ROWS = 8, 6, 3  # each file: one image row and two region rows


def file_vectors(index: int) -> np.ndarray:
    vectors = np.random.default_rng(index).normal(size=(ROWS, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def file_items(index: int) -> list[dict]:
    return [
        {"path": f"/photos/{index}.png", "kind": "image" if r == 0 else "region", "file_rows": ROWS}
        for r in range(ROWS)
    ]


def make_index(folder: Path, files: int = FILES) -> Path:
    with VectorStore.create(folder, DIM, {"name_or_path": "m", "fingerprint": "f"}) as store:
        for index in range(files):
            store.append(file_vectors(index), file_items(index))
        store.save_ann()
    return folder


def assert_aligned(store: VectorStore) -> None:
    """Every row's vector is the one its file was given (no row shifted onto another's vector)."""
    for row, item in enumerate(store.items):
        index = int(Path(item["path"]).stem)
        offset = row - next(r for r, i in enumerate(store.items) if i["path"] == item["path"])
        np.testing.assert_array_equal(store.vectors[row], file_vectors(index)[offset])


def lines(folder: Path) -> list[bytes]:
    return (folder / "items.jsonl").read_bytes().splitlines(keepends=True)


def write_lines(folder: Path, content: list[bytes]) -> None:
    (folder / "items.jsonl").write_bytes(b"".join(content))


# ------------------------------------------------------------------------------------------------ symbolic links
@pytest.mark.parametrize("name", [".lock", "items.jsonl", "vectors.f32", "ann-image.faiss", "ann.json"])
def test_a_writer_never_writes_through_a_link(tmp_path, name):
    folder = make_index(tmp_path / "index")
    victim = tmp_path / "outside.txt"
    victim.write_bytes(b"precious " * 200)
    original = folder / name
    if original.exists():
        os.replace(original, tmp_path / "moved")
    original.symlink_to(victim)
    with pytest.raises(MMGEMUserError, match=rf"{name.replace('.', '[.]')} is a symbolic link"):
        VectorStore(folder, writable=True)
    assert victim.read_bytes() == b"precious " * 200


def test_a_killed_create_with_a_linked_data_file_is_refused(tmp_path):
    folder, victim = tmp_path / "index", tmp_path / "outside.txt"
    folder.mkdir()
    victim.write_bytes(b"precious")
    (folder / "items.jsonl").symlink_to(victim)
    with pytest.raises(MMGEMUserError, match="not an mmgem index"):
        VectorStore.create(folder, DIM, {"name_or_path": "m", "fingerprint": "f"})
    assert victim.read_bytes() == b"precious"


def test_a_folder_left_by_a_killed_create_is_reused(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    for name in ("items.jsonl", "vectors.f32", ".lock", ".meta.json.abc.tmp"):
        (folder / name).touch()  # what a create killed before writing meta.json leaves
    make_index(folder)
    assert len(VectorStore(folder).items) == FILES * ROWS and not list(folder.glob(".meta.json.*"))


def test_a_second_writer_is_one_clear_error(tmp_path):
    folder = make_index(tmp_path / "index")
    with VectorStore(folder, writable=True), pytest.raises(MMGEMUserError, match="being written by another process"):
        VectorStore(folder, writable=True)
    assert len(VectorStore(folder).items) == FILES * ROWS  # readers are not blocked


# ------------------------------------------------------------------------------------------------ damaged items
DAMAGE = {
    "a stray quote": (lambda ls: ls.__setitem__(10, ls[10].replace(b'"kind"', b'"kind""')), "line 11: not valid JSON"),
    "an invalid UTF-8 byte": (
        lambda ls: ls.__setitem__(10, ls[10].replace(b"photos", b"ph\xffotos")),
        "line 11: invalid UTF-8",
    ),
    "a line removed by hand": (lambda ls: ls.pop(10), "lines 10-11: 2 of the 3 rows of /photos/3.png"),
    "lines swapped by hand": (lambda ls: ls.insert(9, ls.pop(10)), "line 11: row 9 comes after row 10"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_reported_by_line_and_repaired_without_shifting_rows(tmp_path, case):
    folder = make_index(tmp_path / "index")
    content = lines(folder)
    DAMAGE[case][0](content)
    write_lines(folder, content)
    with pytest.raises(IndexDamagedError, match=DAMAGE[case][1]) as refused:
        VectorStore(folder)
    assert "mmgem index" in str(refused.value)
    with pytest.raises(IndexDamagedError):
        VectorStore(folder, writable=True)  # a writer repairs only when asked (`mmgem index` asks)
    with VectorStore(folder, writable=True, repair=True) as store:
        assert any(DAMAGE[case][1] in problem for problem in store.repairs)
        assert "/photos/3.png" not in store.paths()  # the damaged image goes whole, to be embedded again
        assert store.paths() == {f"/photos/{i}.png" for i in range(FILES) if i != 3}  # and nothing else
        assert_aligned(store)
    store = VectorStore(folder)  # the repaired index is clean: readers accept it
    assert len(store.items) == (FILES - 1) * ROWS and [i["row"] for i in store.items] == list(range(len(store.items)))
    assert_aligned(store)
    hit = store.search(file_vectors(5)[0], "image", k=1)[0][0]
    assert hit.path == "/photos/5.png" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_a_line_removed_from_an_index_without_rows_is_still_detected(tmp_path):
    folder = make_index(tmp_path / "index")
    legacy = [
        json.dumps({k: v for k, v in json.loads(line).items() if k != "row"}).encode() + b"\n" for line in lines(folder)
    ]
    write_lines(folder, legacy[:4] + legacy[5:])
    with pytest.raises(IndexDamagedError, match="lines 4-5: 2 of the 3 rows of /photos/1.png"):
        VectorStore(folder)


@pytest.mark.parametrize("name", ["items.jsonl", "vectors.f32"])
def test_a_missing_data_file_is_one_clear_error(tmp_path, name):
    folder = make_index(tmp_path / "index")
    (folder / name).unlink()
    (folder / name).mkdir()
    with pytest.raises(IndexDamagedError, match=f"has no {name}"):
        VectorStore(folder)
    with pytest.raises(MMGEMUserError, match=f"{name} is not a regular file"):
        VectorStore(folder, writable=True)


def test_truncated_vectors_are_damage_not_a_silent_cut(tmp_path):
    folder = make_index(tmp_path / "index")
    with open(folder / "vectors.f32", "r+b") as handle:
        handle.truncate(4 * DIM * 7)  # 7 of 18 rows
    with pytest.raises(IndexDamagedError, match="line 8: row 7 is past the end of vectors.f32"):
        VectorStore(folder)
    with VectorStore(folder, writable=True, repair=True) as store:
        assert store.paths() == {"/photos/0.png", "/photos/1.png"}
        assert_aligned(store)


def test_a_torn_tail_is_still_cut_without_a_word(tmp_path):
    folder = make_index(tmp_path / "index")
    with open(folder / "vectors.f32", "ab") as handle:
        handle.write(file_vectors(9).tobytes())
    content = lines(folder)
    write_lines(folder, content + [json.dumps({**file_items(9)[0], "row": 18}).encode() + b"\n", b'{"path": "/pho'])
    with VectorStore(folder, writable=True, repair=True) as store:
        assert store.repairs == [] and len(store.items) == FILES * ROWS
    assert (folder / "items.jsonl").read_bytes() == b"".join(content)


def test_a_repair_killed_between_its_renames_is_finished(tmp_path, monkeypatch):
    folder = make_index(tmp_path / "index")
    content = lines(folder)
    content[4] = b"{oops\n"
    write_lines(folder, content)
    real_replace, calls = os.replace, []

    def killed_after_the_vectors(source, target):
        calls.append(Path(source).name)
        if Path(source).name == "items.jsonl.repair":
            raise KeyboardInterrupt  # stands in for a SIGKILL between the two renames
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_after_the_vectors)
    with pytest.raises(KeyboardInterrupt):
        VectorStore(folder, writable=True, repair=True)
    monkeypatch.undo()
    assert calls == ["vectors.f32.repair", "items.jsonl.repair"] and (folder / "items.jsonl.repair").exists()
    reader = VectorStore(folder)  # a reader meanwhile sees the repaired rows, aligned
    assert "/photos/1.png" not in reader.paths()
    assert_aligned(reader)
    with VectorStore(folder, writable=True, repair=True) as store:  # the next writer finishes the repair
        assert store.repairs == [] and not (folder / "items.jsonl.repair").exists()
        assert_aligned(store)


# ------------------------------------------------------------------------------------------------ ANN cache
@pytest.mark.parametrize("damage", ["truncated faiss", "garbage faiss", "garbage ann.json", "wrong counts"])
def test_a_damaged_ann_cache_is_rebuilt(tmp_path, damage):
    folder = make_index(tmp_path / "index")
    faiss_file = folder / "ann-image.faiss"
    if damage == "truncated faiss":
        faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    elif damage == "garbage faiss":
        faiss_file.write_bytes(b"\x00" * 5000)
    elif damage == "garbage ann.json":
        (folder / "ann.json").write_bytes(b'{"image": ')
    else:
        (folder / "ann.json").write_text(json.dumps({"image": "many", "region": -1}))
    store = VectorStore(folder)
    assert store.rebuilt_anns
    for index in range(FILES):
        hit = store.search(file_vectors(index)[0], "image", k=1)[0][0]
        assert hit.path == f"/photos/{index}.png" and hit.score == pytest.approx(1.0, abs=1e-5)
    with VectorStore(folder, writable=True) as writer:
        writer.save_ann()
    assert VectorStore(folder).rebuilt_anns == []


def test_temporaries_of_a_killed_save_are_removed(tmp_path):
    folder = make_index(tmp_path / "index")
    for name in (".ann-image.faiss.x1.tmp", ".ann.json.x2.tmp"):
        (folder / name).write_bytes(b"half")
    VectorStore(folder).close()
    assert (folder / ".ann-image.faiss.x1.tmp").exists()  # a reader changes nothing
    VectorStore(folder, writable=True).close()
    assert not list(folder.glob(".ann*.tmp"))


def test_remove_paths_rewrites_aligned_rows(tmp_path):
    folder = make_index(tmp_path / "index")
    with VectorStore(folder, writable=True) as store:
        assert store.remove_paths(["/photos/0.png", "/photos/4.png"]) == 2 * ROWS
        store.append(file_vectors(0), file_items(0))
        assert_aligned(store)
        assert store.search(file_vectors(0)[0], "image", k=1)[0][0].path == "/photos/0.png"
        store.save_ann()
    assert_aligned(VectorStore(folder))


@pytest.mark.slow  # a fresh interpreter collecting five modules
@pytest.mark.timeout(300)
def test_the_search_tests_collect_without_the_search_and_app_extras():
    """`pip install -e .[dev]` has no faiss, webdataset or gradio: every search and app test module still collects
    (and skips, saying which extra it needs)."""
    import subprocess
    import sys

    blocker = (
        "import sys, pytest\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('faiss', 'webdataset', 'braceexpand', 'gradio', 'gradio_client'):\n"
        "            raise ModuleNotFoundError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.exit(pytest.main(['--collect-only', '-q', 'tests/test_search.py', 'tests/test_index_store.py',\n"
        "    'tests/test_cli_mistakes_search.py', 'tests/test_app_limits.py', 'tests/test_app.py']))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", blocker], cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 5), result.stdout[-3000:] + result.stderr[-2000:]
    assert "error" not in result.stdout.lower(), result.stdout[-3000:]


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from mmgem.search import store as store_module
from tests.test_index_store import file_items, file_vectors, make_index, DIM

real_write, calls = store_module._write_fd, []

def write_then_die(fd, data):
    calls.append(1)
    if len(calls) == {die_at}:  # half of this write reaches the disk, then the process is killed
        real_write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(fd, data)

store_module._write_fd = write_then_die
with store_module.VectorStore({folder!r}, writable=True) as store:
    for index in range(2, 6):
        store.append(file_vectors(index), file_items(index))
"""


@pytest.mark.slow  # a fresh interpreter per kill (about 15 s of imports each)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("die_at", [1, 4])  # 1: the first batch's vectors; 4: the second batch's items
def test_sigkill_while_appending_then_a_rerun_equals_a_clean_build(tmp_path, die_at):
    import signal
    import subprocess
    import sys

    folder = make_index(tmp_path / "index", files=2)
    repo = str(Path(__file__).resolve().parents[1])
    script = KILLER.format(repo=repo, die_at=die_at, folder=str(folder))
    result = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    with VectorStore(folder, writable=True, repair=True) as store:
        assert store.repairs == []  # a kill is not damage
        done = {int(Path(p).stem) for p in store.paths()}
        assert done == set(range(2 + (die_at - 1) // 2))  # whole files only
        for index in range(FILES):
            if index not in done:
                store.append(file_vectors(index), file_items(index))
        store.save_ann()
    clean = make_index(tmp_path / "clean")
    assert (folder / "vectors.f32").read_bytes() == (clean / "vectors.f32").read_bytes()
    assert (folder / "items.jsonl").read_bytes() == (clean / "items.jsonl").read_bytes()
