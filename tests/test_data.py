"""Tests of the record loaders (JSON Lines and imagefolder) and of ImageCaptionDataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmgem.data.records as records_module
from mmgem.data.records import (
    ImageCaptionDataset,
    ImageRecord,
    RegionRecord,
    export_imagefolder,
    load_imagefolder_records,
    load_jsonl_records,
)
from mmgem.synthetic import generate_dataset, zero_shot_examples

GOOD = {"image": "images/a.png", "caption": "a red circle", "regions": [{"box": [1, 2, 10, 12], "caption": "a dot"}]}

# One bad record per kind of problem, and a fragment of the report that must name it.
BAD_RECORDS = {
    "malformed json": ('{"image": "images/a.png", "caption": ', "malformed JSON"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "missing image key": ({"caption": "x"}, 'missing "image"'),
    "missing image file": ({"image": "images/nope.png", "caption": "x"}, "image file not found"),
    "unreadable image": ({"image": "images/broken.png", "caption": "x"}, "cannot read image"),
    "missing caption": ({"image": "images/a.png"}, 'missing "caption"'),
    "empty caption": ({"image": "images/a.png", "caption": "  \n"}, 'empty "caption"'),
    "caption not text": ({"image": "images/a.png", "caption": 3}, '"caption" is a int'),
    "empty long caption": ({**GOOD, "long_caption": " "}, 'empty "long_caption"'),
    "regions not a list": ({**GOOD, "regions": {"box": [0, 0, 1, 1]}}, '"regions" is a dict'),
    "box of 3 numbers": ({**GOOD, "regions": [{"box": [0, 0, 5], "caption": "c"}]}, "is not 4 numbers"),
    "box with text": ({**GOOD, "regions": [{"box": [0, 0, "5", 5], "caption": "c"}]}, "is not 4 numbers"),
    "box missing": ({**GOOD, "regions": [{"caption": "c"}]}, "is not 4 numbers"),
    "box outside": ({**GOOD, "regions": [{"box": [20, 10, 33, 20], "caption": "c"}]}, "outside the 32x24 image"),
    "box negative": ({**GOOD, "regions": [{"box": [-1, 0, 5, 5], "caption": "c"}]}, "outside the 32x24 image"),
    "box zero area": ({**GOOD, "regions": [{"box": [5, 5, 5, 9], "caption": "c"}]}, "zero or negative area"),
    "box inverted": ({**GOOD, "regions": [{"box": [5, 9, 8, 2], "caption": "c"}]}, "zero or negative area"),
    "empty region caption": ({**GOOD, "regions": [{"box": [0, 0, 5, 5], "caption": ""}]}, 'region 0: empty "caption"'),
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder with a 32x24 RGB image, an RGBA one and a file that is not an image."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 24), (200, 10, 10)).save(root / "images/a.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 128)).save(root / "images/b.png")
    (root / "images/broken.png").write_text("not a png")
    return root


def write_jsonl(path: Path, lines: list) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def test_good_records(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    second = {"image": "images/b.png", "caption": " b ", "long_caption": "long", "objects": [1], "regions": None}
    path = write_jsonl(folder / "records.jsonl", [GOOD, "", second])
    monkeypatch.chdir(folder / "images")  # image paths are relative to the .jsonl file, not to the working folder
    records = load_jsonl_records(path)
    assert [r.line_number for r in records] == [1, 3]
    assert records[0].image_path == str(folder / "images/a.png") and records[0].long_caption is None
    assert records[0].regions == [RegionRecord(box=[1, 2, 10, 12], caption="a dot")]
    assert records[1].regions == [] and records[1].long_caption == "long" and records[1].metadata == {"objects": [1]}


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_each_bad_record_is_reported_with_its_line(folder: Path, kind: str) -> None:
    bad, fragment = BAD_RECORDS[kind]
    path = write_jsonl(folder / "records.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError) as error:
        load_jsonl_records(path)
    message = str(error.value)
    assert "records.jsonl line 3: " in message and fragment in message and "expected" in message
    assert "line 1:" not in message and "line 4:" not in message and "1 of 3 records" in message

    with pytest.warns(UserWarning, match=r"skipped 1 of 3 records") as caught:
        records = load_jsonl_records(path, on_error="skip")
    assert [r.line_number for r in records] == [1, 4]
    assert fragment in str(caught[0].message) and "line 3" in str(caught[0].message)


def test_fail_lists_every_problem_up_to_a_limit(folder: Path) -> None:
    lines = [GOOD] + [bad for bad, _ in BAD_RECORDS.values()]
    path = write_jsonl(folder / "records.jsonl", lines)
    with pytest.raises(ValueError) as error:
        load_jsonl_records(path, max_reported=100)
    reported = {int(n) for n in re.findall(r"line (\d+):", str(error.value))}
    assert reported == set(range(2, len(lines) + 1))
    with pytest.raises(ValueError, match=r"\.\.\. and \d+ more"):
        load_jsonl_records(path, max_reported=3)


def test_bad_region_drops_the_whole_record_and_all_problems_are_named(folder: Path) -> None:
    regions = [{"box": [0, 0, 5, 5], "caption": "fine"}, {"box": [0, 0, 99, 5], "caption": ""}]
    path = write_jsonl(folder / "records.jsonl", [{**GOOD, "regions": regions}])
    with pytest.warns(UserWarning) as caught:
        assert load_jsonl_records(path, on_error="skip") == []
    message = str(caught[0].message)
    assert (
        "line 1: region 1: box [0, 0, 99, 5] is outside" in message and 'line 1: region 1: empty "caption"' in message
    )


def test_reloading_records_decodes_each_image_once_until_it_changes(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second load of the same records (the next training stage) trusts the first decode of an unchanged file; a
    file truncated or rewritten since, or a tighter size limit, is decoded and judged again."""
    path = write_jsonl(folder / "records.jsonl", [GOOD])
    decoded = []
    original = records_module.load_rgb_image
    monkeypatch.setattr(records_module, "load_rgb_image", lambda image: decoded.append(image) or original(image))
    load_jsonl_records(path)
    load_jsonl_records(path)
    assert len(decoded) == 1
    image = folder / "images/a.png"
    image.write_bytes(image.read_bytes()[:40])  # truncated in place
    with pytest.raises(ValueError, match="cannot read image"):
        load_jsonl_records(path)
    Image.new("RGB", (32, 24), (0, 200, 10)).save(image)
    assert len(load_jsonl_records(path)) == 1
    monkeypatch.setenv("MMGEM_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(ValueError, match="cannot read image"):
        load_jsonl_records(path)


def test_bad_policy_and_missing_file(folder: Path) -> None:
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl_records(write_jsonl(folder / "r.jsonl", [GOOD]), on_error="ignore")
    with pytest.raises(FileNotFoundError):
        load_jsonl_records(folder / "absent.jsonl")


def test_generated_dataset_loads_cleanly(tmp_path: Path) -> None:
    paths = generate_dataset(tmp_path / "shapes", 10, 5, 10, seed=1, progress=False)
    for split in ("train", "val", "test"):
        records = load_jsonl_records(paths[split])
        assert all(r.long_caption and r.regions and r.metadata["objects"] for r in records)
    examples = zero_shot_examples(load_jsonl_records(paths["test"]))
    heldout = set(json.loads(paths["labels"].read_text())["heldout_classes"])
    assert len(examples) == 3 and all(label in heldout for _, label in examples)


def test_imagefolder_offline_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets = pytest.importorskip("datasets", reason="imagefolders need the data extra: pip install -e '.[data]'")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    paths = generate_dataset(tmp_path / "shapes", 6, 0, 0, seed=2, progress=False)
    originals = load_jsonl_records(paths["train"])
    export_imagefolder(originals, tmp_path / "folder")
    records = load_imagefolder_records(tmp_path / "folder", cache_dir=tmp_path / "cache")
    assert len(records) == len(originals)
    for loaded, original in zip(records, originals, strict=True):
        # The record holds the file's path, not its pixels: memory does not grow with the number of images.
        assert loaded.image is None and Path(loaded.image_path).is_file()
        assert np.array_equal(np.asarray(loaded.load_image()), np.asarray(original.load_image()))
        assert (loaded.caption, loaded.long_caption) == (original.caption, original.long_caption)
        assert loaded.regions == original.regions
        assert loaded.metadata["objects"] == original.metadata["objects"]


def test_imagefolder_bad_rows(folder: Path, tmp_path: Path) -> None:
    rows = [
        {"file_name": "images/a.png", "caption": "fine", "regions": [{"box": [0, 0, 4, 4], "caption": "c"}]},
        {"file_name": "images/b.png", "caption": "bad box", "regions": [{"box": [0, 0, 40, 4], "caption": "c"}]},
        {"file_name": "images/a.png", "caption": " ", "regions": []},
    ]
    (folder / "images/broken.png").unlink()
    write_jsonl(folder / "metadata.jsonl", rows)
    with pytest.raises(ValueError) as error:
        load_imagefolder_records(folder, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "metadata row 2 (b.png): region 0: box [0, 0, 40, 4] is outside the 16x16 image" in message
    assert 'metadata row 3 (a.png): empty "caption"' in message
    with pytest.warns(UserWarning, match="skipped 2 of 3"):
        records = load_imagefolder_records(folder, on_error="skip", cache_dir=tmp_path / "cache")
    assert [r.caption for r in records] == ["fine"]
    with pytest.raises(ValueError, match="inside the data folder"):
        load_imagefolder_records(folder, cache_dir=folder / "cache")


def test_image_record_accepts_a_path_or_an_image(folder: Path) -> None:
    image = Image.new("L", (8, 8), 7)
    record = ImageRecord(image, "grey")
    assert record.image is image and record.image_path is None
    assert record.load_image().mode == "RGB"
    assert ImageRecord(folder / "images/a.png", "x").image_path == str(folder / "images/a.png")
    with pytest.raises(ValueError):
        ImageRecord(None, "nothing")


def test_decoded_image_cache_gives_the_same_fresh_images_within_its_budget(folder: Path, monkeypatch) -> None:
    """With `image_cache_bytes`, an image is decoded once while the budget lasts; every item is a fresh RGB image
    with the pixels the file decodes to, however the cache served it."""
    Image.new("RGB", (16, 16), (9, 90, 200)).save(folder / "images/c.png")
    records = [ImageRecord(str(folder / f"images/{name}.png"), name) for name in ("a", "b", "c")]
    decoded = []
    original = ImageRecord.load_image
    monkeypatch.setattr(ImageRecord, "load_image", lambda record: decoded.append(record.caption) or original(record))
    plain = ImageCaptionDataset(records)
    expected = [plain[i]["image"].tobytes() for i in range(3)]
    decoded.clear()
    budget = 3 * (32 * 24 + 16 * 16)  # images a and b fit, c does not
    cached = ImageCaptionDataset(records, image_cache_bytes=budget)
    for _ in range(3):
        images = [cached[i]["image"] for i in range(3)]
        assert [image.tobytes() for image in images] == expected and {image.mode for image in images} == {"RGB"}
        images[0].putpixel((0, 0), (1, 2, 3))  # a caller's change does not reach the cache
    assert decoded == ["a", "b", "c", "c", "c"]
    with pytest.raises(ValueError, match="`image_cache_bytes` must be an int >= 0"):
        ImageCaptionDataset(records, image_cache_bytes=-1)


def test_image_caption_dataset(folder: Path) -> None:
    records = [
        ImageRecord(str(folder / "images/b.png"), "short", "a long one", [RegionRecord([0, 0, 4, 4], "r")]),
        ImageRecord(Image.new("RGB", (5, 5)), "plain"),
    ]
    dataset = ImageCaptionDataset(records)
    assert len(dataset) == 2
    item = dataset[0]
    assert set(item) == {"image", "caption", "regions"}
    assert item["image"].mode == "RGB" and item["image"].size == (16, 16)  # RGBA file converted
    assert item["caption"] == "short" and item["regions"] == [{"box": [0, 0, 4, 4], "caption": "r"}]
    assert dataset[1]["regions"] == []
    assert ImageCaptionDataset(records[:1], with_regions=False)[0]["regions"] == []
    assert ImageCaptionDataset(records[:1], use_long_caption=True)[0]["caption"] == "a long one"
    with pytest.raises(ValueError, match="no long_caption"):
        ImageCaptionDataset(records, use_long_caption=True)
