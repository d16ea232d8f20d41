"""Tests of the synthetic shapes dataset generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmgem import cli
from mmgem.synthetic import (
    BACKGROUND_COLOURS,
    COLOURS,
    SETTINGS_STAMP,
    SHAPES,
    SIZES,
    choose_heldout_pairs,
    class_name,
    ensure_dataset,
    generate_dataset,
    load_labels,
    main,
    position_of,
)

# Words that tell images apart: none may appear in the first 77 words of a long caption.
DISCRIMINATIVE_WORDS = {
    *COLOURS,
    *SHAPES,
    *SIZES,
    *BACKGROUND_COLOURS,
    "left",
    "right",
    "top",
    "bottom",
    "centre",
    "one",
    "two",
    "three",
    "four",
}
SPLIT_SIZES = {"num_train": 60, "num_val": 20, "num_test": 40}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_dataset(tmp_path_factory.mktemp("shapes") / "data", **SPLIT_SIZES, seed=3, progress=False)


@pytest.fixture(scope="module")
def splits(dataset: dict[str, Path]) -> dict[str, list[dict]]:
    return {split: read_jsonl(dataset[split]) for split in ("train", "val", "test")}


def test_layout_and_counts(dataset: dict[str, Path], splits: dict[str, list[dict]]) -> None:
    assert {p.name for p in dataset["root"].iterdir()} == {
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "labels.json",
        "images",
    }
    assert [len(splits[s]) for s in ("train", "val", "test")] == [60, 20, 40]
    names = [r["image"] for records in splits.values() for r in records]
    assert len(set(names)) == len(names) == len(list(dataset["images"].iterdir()))
    for name in names:
        with Image.open(dataset["root"] / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    sizes = {"num_train": 8, "num_val": 4, "num_test": 6}
    first = generate_dataset(tmp_path / "a", **sizes, seed=11, progress=False)["root"]
    second = generate_dataset(tmp_path / "b", **sizes, seed=11, progress=False)["root"]
    other = generate_dataset(tmp_path / "c", **sizes, seed=12, progress=False)["root"]
    assert all_files(first) == all_files(second)
    assert (first / "train.jsonl").read_bytes() != (other / "train.jsonl").read_bytes()
    assert (first / "images/train_00000.png").read_bytes() != (other / "images/train_00000.png").read_bytes()


def test_worker_processes_write_the_bytes_one_process_writes(tmp_path: Path, monkeypatch) -> None:
    """Drawn by worker processes or in this one, a dataset is the same byte for byte, redraws of repeated images
    included (here every third first attempt repeats image 0 of its split)."""
    import mmgem.synthetic as synthetic

    original = synthetic._make_record

    def repeating(seed, split, index, attempt, *rest):
        return original(seed, split, 0 if attempt == 0 and index % 3 == 1 else index, attempt, *rest)

    monkeypatch.setattr(synthetic, "_make_record", repeating)
    sizes = {"num_train": 40, "num_val": 6, "num_test": 9}
    monkeypatch.setattr(synthetic, "_PARALLEL_MIN_IMAGES", 10**9)
    serial = generate_dataset(tmp_path / "serial", **sizes, seed=3, progress=False)["root"]
    monkeypatch.setattr(synthetic, "_PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(synthetic.os, "cpu_count", lambda: 2)
    parallel = generate_dataset(tmp_path / "parallel", **sizes, seed=3, progress=False)["root"]
    assert all_files(serial) == all_files(parallel)
    pixels = [Image.open(path).tobytes() for path in sorted((parallel / "images").iterdir())]
    assert len(set(pixels)) == len(pixels) == 55


def test_heldout_pairs(dataset: dict[str, Path], splits: dict[str, list[dict]]) -> None:
    heldout = {tuple(pair) for pair in load_labels(dataset["root"])["heldout_pairs"]}
    assert heldout == set(choose_heldout_pairs(3, 4))
    assert len({c for c, _ in heldout}) == len({s for _, s in heldout}) == 4  # distinct colours and shapes
    for split in ("train", "val"):
        for record in splits[split]:
            assert not {(o["colour"], o["shape"]) for o in record["objects"]} & heldout
    for record in splits["test"]:
        assert {(o["colour"], o["shape"]) for o in record["objects"]} & heldout
    # Every colour and shape still occurs in training, with other partners.
    train_objects = [o for r in splits["train"] for o in r["objects"]]
    assert {o["shape"] for o in train_objects} == set(SHAPES)


def test_labels_json(dataset: dict[str, Path]) -> None:
    labels = load_labels(dataset["root"])
    assert len(labels["classes"]) == len(set(labels["classes"])) == len(COLOURS) * len(SHAPES)
    assert "red circle" in labels["classes"] and class_name("red", "circle") == "red circle"
    assert set(labels["heldout_classes"]) | set(labels["seen_classes"]) == set(labels["classes"])
    assert not set(labels["heldout_classes"]) & set(labels["seen_classes"])
    assert labels["counts"] == {"train": 60, "val": 20, "test": 40}


def test_boxes_are_inside_and_tight(dataset: dict[str, Path], splits: dict[str, list[dict]]) -> None:
    for record in [r for records in splits.values() for r in records]:
        pixels = np.asarray(Image.open(dataset["root"] / record["image"]))
        in_some_box = np.zeros(pixels.shape[:2], dtype=bool)
        for region, obj in zip(record["regions"], record["objects"], strict=True):
            x0, y0, x1, y1 = region["box"]
            assert all(isinstance(v, int) for v in region["box"])
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            is_colour = np.all(pixels == COLOURS[obj["colour"]], axis=-1)
            inside = is_colour[y0:y1, x0:x1]
            # Tight: the object's colour touches all four sides of the box.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            in_some_box[y0:y1, x0:x1] = True
            # Everything else in the box is background.
            assert (pixels[y0:y1, x0:x1][~inside].min(axis=-1) >= 200).all()
        # Outside the boxes there is only background, and it cannot be confused with any object colour.
        assert (pixels[~in_some_box].min(axis=-1) >= 200).all()


def test_objects_regions_and_captions_agree(splits: dict[str, list[dict]]) -> None:
    for record in [r for records in splits.values() for r in records]:
        assert 1 <= len(record["objects"]) <= 4
        phrases = [f"a {o['size']} {o['colour']} {o['shape']}" for o in record["objects"]]
        assert [r["caption"] for r in record["regions"]] == phrases
        expected = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        assert record["caption"] == expected
        centres = [(r["box"][0] + r["box"][2]) / 2 for r in record["regions"]]
        assert centres == sorted(centres)  # listed left to right
        for region, obj in zip(record["regions"], record["objects"], strict=True):
            assert obj["position"] == position_of(region["box"], 64)
        # Objects of one image never overlap.
        boxes = [r["box"] for r in record["regions"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_position_of_grid() -> None:
    assert position_of([0, 0, 10, 10], 64) == "top left"
    assert position_of([27, 27, 37, 37], 64) == "centre"
    assert position_of([54, 27, 64, 37], 64) == "right"
    assert position_of([27, 54, 37, 64], 64) == "bottom"


def test_long_captions_put_details_late(splits: dict[str, list[dict]]) -> None:
    for record in [r for records in splits.values() for r in records]:
        words = record["long_caption"].replace(",", " ").replace(".", " ").replace(";", " ").split()
        assert len(record["long_caption"].split()) > 100
        assert not DISCRIMINATIVE_WORDS & set(words[:77])
        late = set(words[77:])
        for obj in record["objects"]:
            assert {obj["colour"], obj["shape"], obj["size"]} <= late
        assert record["long_caption"].split(". ")[-1].startswith("The background")
        assert set(record["background"]["colours"]) <= set(words[-12:])


def test_single_object_share_and_zero_shot(splits: dict[str, list[dict]]) -> None:
    for split, count in (("train", 60), ("val", 20), ("test", 40)):
        assert sum(len(r["objects"]) == 1 for r in splits[split]) == round(0.3 * count)
    assert any(len(r["objects"]) == 4 for r in splits["train"])


def test_splits_are_disjoint(dataset: dict[str, Path], splits: dict[str, list[dict]]) -> None:
    seen = set()
    for record in [r for records in splits.values() for r in records]:
        pixels = np.asarray(Image.open(dataset["root"] / record["image"])).tobytes()
        assert pixels not in seen
        seen.add(pixels)


def test_output_is_atomic_and_protected(tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_dataset(output, 2, 1, 1, progress=False)
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    generate_dataset(output, 2, 1, 1, progress=False, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "train.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    with pytest.raises(ValueError, match="image_size"):
        generate_dataset(tmp_path / "small", 2, 1, 1, image_size=16, progress=False)
    assert not (tmp_path / "small").exists()


def test_empty_existing_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    paths = generate_dataset(tmp_path / "empty", 3, 0, 0, image_size=96, progress=False)
    assert len(read_jsonl(paths["train"])) == 3 and read_jsonl(paths["val"]) == []
    with Image.open(paths["root"] / read_jsonl(paths["train"])[0]["image"]) as image:
        assert image.size == (96, 96)


def test_cli(tmp_path: Path) -> None:
    argv = ["--output-dir", str(tmp_path / "cli"), "--num-train", "3", "--num-val", "2", "--num-test", "2"]
    assert main([*argv, "--image-size", "48", "--seed", "5", "--no-progress"]) == 0
    assert len(read_jsonl(tmp_path / "cli" / "test.jsonl")) == 2
    with pytest.raises(FileExistsError):
        main([*argv, "--no-progress"])
    assert main([*argv, "--no-progress", "--overwrite"]) == 0


def test_ensure_dataset_reuses_a_folder_made_with_the_same_settings(tmp_path: Path) -> None:
    settings = dict(num_train=6, num_val=2, num_test=2, image_size=32, seed=3, max_objects=2, num_heldout_pairs=0)
    paths = ensure_dataset(tmp_path / "d", progress=False, **settings)
    marker = paths["images"] / "train_00000.png"
    first = marker.read_bytes()
    marker.write_bytes(b"left alone when the settings match")
    again = ensure_dataset(tmp_path / "d", progress=False, **settings)
    assert again == paths and marker.read_bytes() == b"left alone when the settings match"
    changed = ensure_dataset(tmp_path / "d", progress=False, **(settings | {"seed": 4}))
    assert changed["train"] == paths["train"] and marker.read_bytes() != first  # regenerated with the new seed
    assert json.loads((tmp_path / "d" / SETTINGS_STAMP).read_text())["seed"] == 4


def horizontal_centres(record: dict) -> list[float]:
    return sorted((region["box"][0] + region["box"][2]) / 2 for region in record["regions"])


def test_min_horizontal_gap_keeps_object_centres_apart(tmp_path: Path) -> None:
    sizes = dict(num_train=80, num_val=0, num_test=0, image_size=64, seed=5, max_objects=3, num_heldout_pairs=0)
    free = generate_dataset(tmp_path / "free", **sizes, progress=False)
    apart = generate_dataset(tmp_path / "apart", **sizes, min_horizontal_gap=8, progress=False)
    free_records, apart_records = read_jsonl(free["train"]), read_jsonl(apart["train"])
    for record in apart_records:
        centres = horizontal_centres(record)
        assert all(right - left >= 8 for left, right in zip(centres, centres[1:])), record["regions"]
        assert [r["caption"] for r in record["regions"]] == [
            r["caption"] for r in sorted(record["regions"], key=lambda r: (r["box"][0] + r["box"][2]) / 2)
        ]
    redrawn = 0
    for index, (free_record, apart_record) in enumerate(zip(free_records, apart_records, strict=True)):
        centres = horizontal_centres(free_record)
        already_apart = all(right - left >= 8 for left, right in zip(centres, centres[1:]))
        image = f"images/train_{index:05d}.png"
        same_image = (free["root"] / image).read_bytes() == (apart["root"] / image).read_bytes()
        # A layout that already keeps the gap is the one drawn: the option only re-draws the others.
        assert same_image == already_apart and (free_record == apart_record) == already_apart
        redrawn += not already_apart
    assert redrawn > 0


@pytest.mark.parametrize("gap", [-1, 2.5, True, 32])
def test_min_horizontal_gap_is_checked_before_anything_is_written(tmp_path: Path, gap: object) -> None:
    with pytest.raises(ValueError, match="min_horizontal_gap"):
        generate_dataset(tmp_path / "out", 2, 1, 1, max_objects=3, min_horizontal_gap=gap, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_min_horizontal_gap(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    argv = ["--output-dir", str(tmp_path / "cli"), "--num-train", "6", "--num-val", "0", "--num-test", "0"]
    assert main([*argv, "--max-objects", "3", "--min-horizontal-gap", "8", "--no-progress"]) == 0
    for record in read_jsonl(tmp_path / "cli" / "train.jsonl"):
        centres = horizontal_centres(record)
        assert all(right - left >= 8 for left, right in zip(centres, centres[1:]))
    capsys.readouterr()
    monkeypatch.delenv("MMGEM_DEBUG", raising=False)
    bad = ["generate-data", *argv, "--overwrite", "--min-horizontal-gap", "-3", "--no-progress"]
    assert cli.main(bad) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "min_horizontal_gap" in error, error
