"""`mmgem index` / `mmgem search` and their Python API: exact self-matches, regions, resuming, interruptions, shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgem.search import ImageSearch, VectorStore, index_images
from mmgem.search import indexer as indexer_module
from mmgem.search.indexer import grid_boxes
from mmgem.search.sources import load_image
from mmgem.search.store import group_by_path
from tests.search_helpers import draw_images, readable_tiny_mmgem, save_model

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("faiss", reason="the index needs the search extra (pip install 'mmgem[search]')")


@pytest.fixture(scope="module")
def model_and_processor():
    return readable_tiny_mmgem()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_and_processor):
    return save_model(*model_and_processor, tmp_path_factory.mktemp("model"))


@pytest.fixture()
def image_dir(tmp_path):
    draw_images(tmp_path / "photos", 3)
    draw_images(tmp_path / "photos" / "nested" / "deeper", 2, start=3)
    return tmp_path / "photos"


def build(model_and_processor, images, output, **kwargs):
    kwargs.setdefault("progress", False)
    return index_images(*model_and_processor, str(images), output, model_name="tiny", **kwargs)


def test_index_holds_every_image_region_and_caption(model_and_processor, image_dir, tmp_path):
    summary = build(
        model_and_processor, image_dir, tmp_path / "index", captions=True, region_grids=[2, 3], batch_size=2
    )
    assert summary["added"] == 5 and summary["failed"] == []
    store = VectorStore(tmp_path / "index")
    paths = sorted({item["path"] for item in store.items})
    assert paths == sorted(str(p) for p in image_dir.rglob("*.png"))  # recursive, absolute paths
    assert (store.count("image"), store.count("region"), store.count("caption")) == (5, 5 * 13, 5)
    assert len(store.items) == store.vectors.shape[0] == 5 * 15
    np.testing.assert_allclose(np.linalg.norm(store.vectors, axis=1), 1.0, atol=1e-5)
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert meta["ann"]["library"] == "faiss" and meta["region_grids"] == [2, 3]


def test_vectors_equal_the_models_own_embeddings(model_and_processor, image_dir, tmp_path):
    model, processor = model_and_processor
    build(model_and_processor, image_dir, tmp_path / "index", captions=True, region_grids=[2])
    store = VectorStore(tmp_path / "index")
    path = str(image_dir / "shape_0.png")
    rows = {item["kind"]: i for i, item in enumerate(store.items) if item["path"] == path and item["kind"] != "region"}
    image = load_image(path)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=processor(images=[image])["pixel_values"]).pooler_output
        caption = processor.decode_captions(model.generate(**processor(images=[image])))[0]
        text = model.get_text_features(**processor(text=[caption])).pooler_output
        boxes = grid_boxes(processor.image_processor, image.width, image.height, [2])
        inputs = processor(images=[image], boxes=[boxes])
        regions = model.get_image_features(pixel_values=inputs["pixel_values"], boxes=inputs["boxes"]).pooler_output
    normalise = torch.nn.functional.normalize
    np.testing.assert_allclose(store.vectors[rows["image"]], normalise(expected, dim=-1)[0].numpy(), atol=1e-5)
    assert store.items[rows["caption"]]["caption"] == caption and caption.strip()
    np.testing.assert_allclose(store.vectors[rows["caption"]], normalise(text, dim=-1)[0].numpy(), atol=1e-5)
    region_rows = [i for i, item in enumerate(store.items) if item["path"] == path and item["kind"] == "region"]
    np.testing.assert_allclose(store.vectors[region_rows], normalise(regions, dim=-1).numpy(), atol=1e-5)
    assert [store.items[i]["box"] for i in region_rows] == [
        [0, 0, 32, 32],
        [32, 0, 64, 32],
        [0, 32, 32, 64],
        [32, 32, 64, 64],
    ]


def test_search_by_image_region_and_caption_finds_the_exact_match(model_and_processor, image_dir, tmp_path):
    build(model_and_processor, image_dir, tmp_path / "index", captions=True, region_grids=[2])
    search = ImageSearch(tmp_path / "index", *model_and_processor)
    target = str(image_dir / "nested" / "deeper" / "shape_4.png")
    hits = search.image(target, k=3)
    assert hits[0].path == target and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len({h.path for h in hits}) == 3 and hits[1].score < hits[0].score
    # A region query with one of the indexed boxes finds that box of that image.
    region_hits = search.image(target, k=2, region=(32, 0, 64, 32))
    assert region_hits[0].path == target and region_hits[0].item["box"] == [32, 0, 64, 32]
    assert region_hits[0].score == pytest.approx(1.0, abs=1e-5)
    # A text query equal to the image's caption: caption similarity 1 (weight 1 ranks by captions only).
    caption = next(i["caption"] for i in search.store.items if i["path"] == target and i["kind"] == "caption")
    text_hits = search.text(caption, k=5, caption_weight=1.0)
    assert text_hits[0].path == target and text_hits[0].score == pytest.approx(1.0, abs=1e-5)
    # The fused score is the stated mix of the two similarities.
    mixed = search.text(caption, k=5, caption_weight=0.25)
    for hit in mixed:
        assert hit.score == pytest.approx(0.75 * hit.item["image_score"] + 0.25 * hit.item["caption_score"], abs=1e-6)


def test_ann_results_equal_exact_search(model_and_processor, image_dir, tmp_path):
    build(model_and_processor, image_dir, tmp_path / "index", region_grids=[2, 3])
    search = ImageSearch(tmp_path / "index", *model_and_processor)
    for query in ("a red circle", "a small blue square", "zzz"):
        ann, exact = search.text(query, k=5), search.text(query, k=5, exact=True)
        assert [h.path for h in ann] == [h.path for h in exact]
        np.testing.assert_allclose([h.score for h in ann], [h.score for h in exact], atol=1e-5)
    ann = search.image(str(image_dir / "shape_1.png"), region=(0, 0, 40, 40), k=5)
    exact = search.image(str(image_dir / "shape_1.png"), region=(0, 0, 40, 40), k=5, exact=True)
    assert [(h.path, h.item["box"]) for h in ann] == [(h.path, h.item["box"]) for h in exact]


def test_rerun_adds_only_new_images_and_equals_a_fresh_build(model_and_processor, image_dir, tmp_path):
    first = build(model_and_processor, image_dir, tmp_path / "index")
    again = build(model_and_processor, image_dir, tmp_path / "index")
    assert (first["added"], again["added"], again["skipped"]) == (5, 0, 5)
    draw_images(image_dir / "new", 2, start=5)
    more = build(model_and_processor, image_dir, tmp_path / "index")
    assert (more["added"], more["skipped"]) == (2, 5)
    build(model_and_processor, image_dir, tmp_path / "fresh")
    resumed, fresh = VectorStore(tmp_path / "index"), VectorStore(tmp_path / "fresh")
    order = {item["path"] + str(item.get("box")): i for i, item in enumerate(fresh.items)}
    rows = [order[item["path"] + str(item.get("box"))] for item in resumed.items]
    assert sorted(rows) == list(range(len(fresh.items)))
    np.testing.assert_allclose(resumed.vectors, fresh.vectors[rows], atol=1e-6)
    assert resumed.count("image") == 7


def test_interrupted_run_leaves_a_consistent_index_and_resumes(model_and_processor, image_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = indexer_module._rows_for_batch

    def interrupt_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(indexer_module, "_rows_for_batch", interrupt_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build(model_and_processor, image_dir, tmp_path / "index", batch_size=2)
    monkeypatch.undo()
    store = VectorStore(tmp_path / "index")
    assert store.count("image") == 2 and len(store.items) == store.vectors.shape[0] == 2 * 5
    summary = build(model_and_processor, image_dir, tmp_path / "index", batch_size=2)
    assert (summary["added"], summary["skipped"]) == (3, 2)
    assert VectorStore(tmp_path / "index").count("image") == 5


def test_a_torn_tail_is_cut_back_to_the_last_complete_image(model_and_processor, image_dir, tmp_path):
    build(model_and_processor, image_dir, tmp_path / "index", region_grids=[2])
    folder = tmp_path / "index"
    complete = VectorStore(folder)
    dim, rows = complete.dim, len(complete.items)
    # A crash mid-append: 3 of an image's 5 vectors, and 2 item lines, the second cut short.
    with open(folder / "vectors.f32", "ab") as handle:
        handle.write(np.ones((3, dim), np.float32).tobytes())
    line = json.dumps({"path": "/x.png", "kind": "image", "file_rows": 5})
    with open(folder / "items.jsonl", "a") as handle:
        handle.write(line + "\n" + line[:10])
    with VectorStore(folder, writable=True) as repaired:
        assert len(repaired.items) == rows and repaired.vectors.shape == (rows, dim)
    assert (folder / "vectors.f32").stat().st_size == rows * dim * 4
    assert len((folder / "items.jsonl").read_text().splitlines()) == rows
    # The ANN cache covers exactly the repaired rows, and a later run reuses it.
    assert ImageSearch(folder, *model_and_processor).image(str(image_dir / "shape_2.png"), k=1)[0].score > 0.9999


def test_webdataset_shards(model_and_processor, tmp_path):
    wds = pytest.importorskip("webdataset", reason="shards need the search extra (pip install 'mmgem[search]')")
    paths = draw_images(tmp_path / "drawn", 4)
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(shards / f"part-{shard:03d}.tar")) as sink:
            for i in range(2):
                path = paths[2 * shard + i]
                sink.write({"__key__": f"sample{2 * shard + i}", "png": path.read_bytes(), "txt": f"caption {i}"})
    summary = build(model_and_processor, str(shards / "part-{000..001}.tar"), tmp_path / "index")
    assert summary["added"] == 4
    store = VectorStore(tmp_path / "index")
    keys = sorted({item["path"] for item in store.items})
    assert keys[0] == f"{(shards / 'part-000.tar').resolve()}#sample0.png"
    assert np.array_equal(np.asarray(load_image(keys[3])), np.asarray(load_image(str(paths[3]))))
    assert {item["text"] for item in store.items} == {"caption 0", "caption 1"}
    assert build(model_and_processor, str(shards), tmp_path / "index")["added"] == 0  # a folder of shards, all done
    search = ImageSearch(tmp_path / "index", *model_and_processor)
    assert search.image(str(paths[2]), k=1)[0].path.endswith("part-001.tar#sample2.png")


def test_group_by_path_keeps_the_best_hit_per_image():
    from mmgem.search.store import Hit

    hits = [Hit(0, 0.5, {"path": "a"}), Hit(1, 0.9, {"path": "b"}), Hit(2, 0.7, {"path": "a"})]
    assert [(h.path, h.score) for h in group_by_path(hits, 5)] == [("b", 0.9), ("a", 0.7)]


# ------------------------------------------------------------------------------------------------ command line
def run_cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)  # the worktree's code (the venv's editable install may point elsewhere)
    return subprocess.run(
        [sys.executable, "-m", "mmgem.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_index_then_search_as_a_user_types_it(model_dir, image_dir, tmp_path):
    result = run_cli(
        "index",
        "--model",
        str(model_dir),
        "--images",
        str(image_dir),
        "--output",
        "idx",
        "--captions",
        "--region-grids",
        "2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Indexed 5 new images" in result.stdout and "Indexing images" in result.stderr  # tqdm bar
    target = image_dir / "shape_1.png"
    result = run_cli("search", "--index", "idx", "--image", str(target), "--k", "2", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert len(hits) == 2 and hits[0]["path"] == str(target) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    result = run_cli("search", "--index", "idx", "a red circle", "-k", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "path"] and len(lines) == 5
    result = run_cli("search", "--index", "idx", "--image", str(target), "--region", "0,0,32,32", cwd=tmp_path)
    assert result.returncode == 0 and "box 0,0,32,32" in result.stdout.splitlines()[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--index", "idx", "--image", "q.png", "--region", "1,2,3"], "`--region` must be x0,y0,x1,y1"),
        (["search", "--index", "nowhere", "a cat"], "`--index` nowhere is not an mmgem index"),
        (["search", "--index", "idx"], "give either a text query or `--image`"),
        (["search", "--index", "idx", "a cat", "--k", "0"], "`--k` must be a positive int"),
        (["index", "--model", "m", "--images", "missing_dir", "--output", "o"], "`--images` must be a folder"),
        (["index", "--model", "m", "--images", ".", "--output", "o", "--region-grids", "2,x"], "`--region-grids`"),
        (["app", "--model", "m", "--port", "70000"], "`--port` must be in 1..65535"),
        (["app", "--model", "m", "--index", "nowhere"], "`--index` nowhere is not an mmgem index"),
    ],
)
def test_cli_bad_arguments_name_the_flag(argv, message, tmp_path, monkeypatch, capsys):
    from mmgem.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "meta.json").write_text("{}")
    (tmp_path / "q.png").write_bytes(b"")
    assert main(argv) == 2  # a user mistake: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith(f"mmgem {argv[0]}: error: ") and message in err and err.count("\n") == 1, err


def test_another_model_cannot_extend_or_query_the_index(model_and_processor, image_dir, tmp_path):
    build(model_and_processor, image_dir, tmp_path / "index")
    other = readable_tiny_mmgem(seed=1)
    with pytest.raises(ValueError, match="not the model the index"):
        index_images(*other, str(image_dir), tmp_path / "index", progress=False)
    with pytest.raises(ValueError, match="not the model the index"):
        ImageSearch(tmp_path / "index", *other)
    with pytest.raises(ValueError, match="region-grids"):
        build(model_and_processor, image_dir, tmp_path / "index", region_grids=[3])
    with pytest.raises(ValueError, match="needs an index built with captions"):
        ImageSearch(tmp_path / "index", *model_and_processor).text("a cat", caption_weight=0.5)


@pytest.mark.slow
def test_search_benchmark_runs_and_meets_the_recall_target(tmp_path):
    from benchmarks import search as search_benchmark

    argv = ["--quick", "--counts", "300", "--images", "4", "--threads", "1", "--libraries", "--output", str(tmp_path)]
    assert search_benchmark.main(argv) == 0
    records = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(records) == {
        "query_latency_300",
        "ann_only_latency_300",
        "recall@10_300",
        "indexing",
        "usearch_vs_faiss_build_300",
        "usearch_vs_faiss_query_300",
        "usearch_vs_faiss_recall@10_300",
    }
    assert records["recall@10_300"]["ours_s"] >= 0.99 and records["recall@10_300"]["met"] is True
    assert all(r["ours_s"] > 0 and r["baseline_s"] > 0 for r in records.values())
    assert "| indexing |" in (tmp_path / "table.md").read_text()
