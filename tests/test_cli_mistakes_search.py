"""Mistakes a user makes with `mmgem index`, `mmgem search`, `mmgem app` and `mmgem export-onnx`: each is one line
`mmgem COMMAND: error: ...` naming the flag and the fix, exit status 2, never a traceback. The table holds the
second audit's cases (and the first audit's for these commands live in tests/test_search.py); each row runs the
subcommand through the `mmgem` entry point with the arguments a user types.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss", reason="mmgem index / search need the search extra (pip install 'mmgem[search]')")

from mmgem import cli  # noqa: E402
from mmgem.search import ImageSearch, index_images  # noqa: E402
from mmgem.search.store import VectorStore  # noqa: E402
from tests.outside import run_cli  # noqa: E402
from tests.search_helpers import draw_images, readable_tiny_mmgem, save_model  # noqa: E402

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model, another model, three photos, an index of them, a text file named like an image."""
    root = tmp_path_factory.mktemp("mistakes")
    model, processor = readable_tiny_mmgem()
    save_model(model, processor, root / "model")
    save_model(*readable_tiny_mmgem(seed=1), root / "other")
    draw_images(root / "photos", 3)
    index_images(
        model,
        processor,
        str(root / "photos"),
        root / "idx",
        model_name=str(root / "model"),
        region_grids=[2],
        progress=False,
    )
    index_images(
        model,
        processor,
        str(root / "photos"),
        root / "plain",
        model_name=str(root / "model"),
        region_grids=[],
        progress=False,
    )
    (root / "notes.png").write_text("not an image")
    return {"root": root, "model": model, "processor": processor}


def damaged_copy(root: Path) -> str:
    import shutil

    target = root / "damaged"
    if not target.exists():
        shutil.copytree(root / "idx", target)
        lines = (target / "items.jsonl").read_bytes().splitlines(keepends=True)
        lines[3] = lines[3].replace(b'"kind"', b'"kind""')
        (target / "items.jsonl").write_bytes(b"".join(lines))
    return str(target)


def linked_copy(root: Path) -> str:
    import shutil

    target = root / "linked"
    if not target.exists():
        shutil.copytree(root / "idx", target)
        (root / "victim.txt").write_text("precious")
        (target / "vectors.f32").unlink()
        (target / "vectors.f32").symlink_to(root / "victim.txt")
    return str(target)


def model_moved_copy(root: Path) -> str:
    import json
    import shutil

    target = root / "moved"
    if not target.exists():
        shutil.copytree(root / "idx", target)
        meta = json.loads((target / "meta.json").read_text())
        meta["model"]["name_or_path"] = str(root / "model-that-moved")
        (target / "meta.json").write_text(json.dumps(meta))
    return str(target)


# (name, argv with {root} placeholders or a callable of root, fragments the one line must hold)
MISTAKES = [
    (
        "region outside the query image",
        ["search", "--index", "{root}/idx", "--image", "{root}/photos/shape_0.png", "--region", "10,10,500,40"],
        ["`--region` 10,10,500,40", "inside the 64x64 query image"],
    ),
    (
        "region with no area",
        ["search", "--index", "{root}/idx", "--image", "{root}/photos/shape_0.png", "--region", "30,10,30,40"],
        ["`--region`", "x0 < x1"],
    ),
    (
        "query image that is not an image",
        ["search", "--index", "{root}/idx", "--image", "{root}/notes.png"],
        ["`--image`", "not a readable image"],
    ),
    (
        "region search in an index without regions",
        ["search", "--index", "{root}/plain", "--image", "{root}/photos/shape_0.png", "--region", "0,0,32,32"],
        ["no regions", "--target images"],
    ),
    (
        "caption weight without captions",
        ["search", "--index", "{root}/idx", "a cat", "--caption-weight", "0.5"],
        ["`--caption-weight`", "--captions"],
    ),
    (
        "caption weight out of range",
        ["search", "--index", "{root}/idx", "a cat", "--caption-weight", "2"],
        ["`--caption-weight` must be in [0, 1]"],
    ),
    (
        "search with another model",
        ["search", "--index", "{root}/idx", "--model", "{root}/other", "a cat"],
        ["`--model` is not the model the index", "pass that model"],
    ),  # found after the model loads: its bar first
    (
        "index with another model",
        [
            "index",
            "--model",
            "{root}/other",
            "--images",
            "{root}/photos",
            "--output",
            "{root}/idx",
            "--region-grids",
            "2",
            "--no-progress",
        ],
        ["`--model`", "is not the model the index", "new `--output`"],
    ),
    (
        "index with other region grids",
        [
            "index",
            "--model",
            "{root}/model",
            "--images",
            "{root}/photos",
            "--output",
            "{root}/idx",
            "--region-grids",
            "3",
            "--no-progress",
        ],
        ["`--region-grids` 3 is not the index's 2"],
    ),
    (
        "search an index whose model moved",
        ["search", "--index", "{moved}", "a cat"],
        ["model-that-moved", "cannot be loaded", "`--model`"],
    ),
    (
        "search a damaged index",
        ["search", "--index", "{damaged}", "a cat"],
        ["`--index`", "is damaged: items.jsonl line 4: not valid JSON", "mmgem index"],
    ),
    (
        "index into a folder with a linked file",
        [
            "index",
            "--model",
            "{root}/model",
            "--images",
            "{root}/photos",
            "--output",
            "{linked}",
            "--region-grids",
            "2",
            "--no-progress",
        ],
        ["`--output`", "vectors.f32 is a symbolic link"],
    ),
    (
        "index into a folder that is not an index",
        ["index", "--model", "{root}/model", "--images", "{root}/photos", "--output", "{root}/photos", "--no-progress"],
        ["`--output`", "is not an mmgem index", "new or empty folder"],
    ),
    (
        "app with a model folder that does not exist",
        ["app", "--model", "nonexistent_dir"],
        ["`--model` nonexistent_dir: no such folder"],
    ),
    ("app with a bad upload limit", ["app", "--model", "{root}/model", "--max-upload-mb", "0"], ["`--max-upload-mb`"]),
    (
        "export-onnx of a folder that does not exist",
        ["export-onnx", "--model", "nope"],
        ["`--model` nope: no such folder"],
    ),
]


def expand(argv: list[str], root: Path) -> list[str]:
    values = {
        "root": str(root),
        "damaged": damaged_copy(root),
        "linked": linked_copy(root),
        "moved": model_moved_copy(root),
    }
    return [a.format(**values) for a in argv]


@pytest.mark.parametrize(("argv", "fragments"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_one_line_naming_the_flag(world, argv, fragments, capsys, monkeypatch):
    monkeypatch.delenv("MMGEM_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = cli.main(expand(argv, world["root"]))
    out, err = capsys.readouterr()
    assert status == 2, out + err
    # The error is the only line but for the bar of a model that had to load to tell it (another model's index).
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    if "{root}/other" in argv:
        lines = [line for line in lines if not line.startswith("Loading weights")]
    assert len(lines) == 1 and "Traceback" not in err, err
    err = lines[0]
    assert err.startswith(f"mmgem {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    if "linked" in " ".join(argv):
        assert (world["root"] / "victim.txt").read_text() == "precious"


def test_a_second_writer_is_told_to_wait(world, capsys, monkeypatch):
    root = world["root"]
    with VectorStore(root / "idx", writable=True):
        status = cli.main(
            [
                "index",
                "--model",
                str(root / "model"),
                "--images",
                str(root / "photos"),
                "--output",
                str(root / "idx"),
                "--region-grids",
                "2",
                "--no-progress",
            ]
        )
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "being written by another process" in err, err


def test_index_without_the_search_extra(world, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` meets when faiss-cpu is not installed
    root = world["root"]
    status = cli.main(
        ["index", "--model", str(root / "model"), "--images", str(root / "photos"), "--output", str(root / "new")]
    )
    err = capsys.readouterr().err
    assert status == 2 and 'pip install "mmgem[search]"' in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "new").exists()


def test_k_zero_in_the_python_api(world):
    search = ImageSearch(world["root"] / "idx", world["model"], world["processor"])
    for call in (
        lambda: search.text("a cat", k=0),
        lambda: search.image(str(world["root"] / "photos" / "shape_0.png"), k=0),
    ):
        with pytest.raises(ValueError, match="`k` must be a positive int"):
            call()


def test_a_folder_left_by_a_killed_create_is_indexed(world, capsys):
    root = world["root"]
    folder = root / "killed"
    folder.mkdir()
    for name in ("items.jsonl", "vectors.f32", ".lock"):
        (folder / name).touch()
    status = cli.main(
        [
            "index",
            "--model",
            str(root / "model"),
            "--images",
            str(root / "photos"),
            "--output",
            str(folder),
            "--no-progress",
        ]
    )
    assert status == 0 and "Indexed 3 new images" in capsys.readouterr().out


@pytest.mark.slow  # `mmgem search` in a fresh interpreter: the terminal's encoding is what fails
@pytest.mark.timeout(300)
def test_non_utf8_file_names_print_in_the_table(world, tmp_path):
    if sys.platform != "linux":
        pytest.skip("file names that are not UTF-8 are a Linux (POSIX bytes) matter")
    photos = tmp_path / "photos"
    draw_images(photos, 2)
    odd = os.fsencode(photos) + b"/caf\xe9.png"
    os.rename(photos / "shape_1.png", odd)
    index_images(
        world["model"],
        world["processor"],
        str(photos),
        tmp_path / "idx",
        model_name=str(world["root"] / "model"),
        progress=False,
    )
    result = run_cli("search", "--index", str(tmp_path / "idx"), "--image", os.fsdecode(odd), "-k", "2", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "caf\\xe9.png" in result.stdout.splitlines()[2], result.stdout
