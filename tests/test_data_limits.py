"""Hostile data in every format: `--data-on-error` holds (raise: the record named; skip: dropped and counted), one
JSON decoder with depth / integer / UTF-8 limits, one data-root rule, member and caption caps."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import tracemalloc
import warnings
from pathlib import Path

import pytest

from mmgem.data.formats import Shard, SourceOptions
from mmgem.data.formats.detect import open_source
from mmgem.data.records import load_jsonl_records
from mmgem.data.safe_json import JSONProblem, nesting_depth, parse_json
from mmgem.data.sources import StreamingImageTextDataset

from .published_layouts import (
    image_bytes,
    shape_image,
    write_coco_captions,
    write_karpathy,
    write_llava,
    write_refer,
    write_visual_genome,
)

pytestmark = pytest.mark.fast

BOX = [8, 4, 40, 30]
DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE_INT = b'{"caption": "x", "n": ' + b"7" * 5000 + b"}"


# ---------------------------------------------------------------------------------------------------------- decoder
@pytest.mark.parametrize(
    "data, fragment",
    [
        (DEEP, "nested 100,000 levels deep (at most 100"),
        (b'{"a": ' + b"[" * 101 + b"]" * 101 + b"}", "nested 102 levels deep"),
        (HUGE_INT, "an integer with 5,000 digits (at most 4,300"),
        (b'{"a": -' + b"1" * 4301 + b"}", "4,301 digits"),
        (b'{"caption": "caf\xe9"}', "invalid UTF-8 (byte 0xe9 at offset 16"),
        (b'{"a": 1', "malformed JSON (Expecting ',' delimiter at line 1 column 8)"),
    ],
)
def test_parse_json_names_the_problem(data, fragment):
    with pytest.raises(JSONProblem) as error:
        parse_json(data)
    assert fragment in str(error.value)


def test_parse_json_limits_and_what_stays_valid(monkeypatch):
    # Brackets and digits inside strings are text, not structure.
    assert parse_json(b'{"a": "' + b"[" * 500 + b"7" * 5000 + b'"}')["a"].startswith("[[[")
    assert parse_json(b'{"a": -' + b"1" * 4300 + b"}")["a"] < 0  # exactly at the limit
    assert nesting_depth('[{"a": [1, "]]]]"]}]') == 3
    monkeypatch.setenv("MMGEM_MAX_JSON_INT_DIGITS", "0")  # 0: no limit of ours (sys.set_int_max_str_digits's rule)
    with pytest.raises(JSONProblem, match="over Python's limit"):  # Python's own 4,300 still applies
        parse_json(HUGE_INT)
    monkeypatch.setenv("MMGEM_MAX_JSON_DEPTH", "3")
    with pytest.raises(JSONProblem, match="nested 4 levels deep"):
        parse_json("[[[[]]]]")


# ---------------------------------------------------------------------------------------------------------- JSONL
@pytest.mark.parametrize(
    "line, fragment",
    [(DEEP, "nested 100,000 levels deep"), (HUGE_INT, "5,000 digits"), (b'{"caption": "\xff"}', "invalid UTF-8")],
)
def test_jsonl_hostile_line_is_one_bad_record_with_its_line(tmp_path, line, fragment):
    shape_image().save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "caption": "a white box"}).encode()
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join([good, good, line, good]) + b"\n")
    with pytest.raises(ValueError) as error:
        load_jsonl_records(path)
    assert "records.jsonl line 3: " in str(error.value) and fragment in str(error.value)
    with pytest.warns(UserWarning, match="skipped 1 of 4 records"):
        assert len(load_jsonl_records(path, on_error="skip")) == 3


# ---------------------------------------------------------------------------------------------------------- formats
def _stream(spec, on_error="fail", data_format=None, **options):
    source = open_source(str(spec), data_format, SourceOptions(shuffle=False, **options), on_error)
    dataset = StreamingImageTextDataset([source], on_error=on_error, epochs=1)
    dataset.shard = Shard()
    return dataset


def _tar(path: Path, samples: list[dict[str, bytes]], gzip: bool = False) -> Path:
    """A shard from {extension: bytes} samples (raw bytes: the .json need not be valid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gzip else "w") as tar:
        for index, sample in enumerate(samples):
            for extension, data in sample.items():
                info = tarfile.TarInfo(f"{index:06d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _web(json_bytes: bytes | None = None, caption: str = "a white box") -> dict[str, bytes]:
    sample = {"png": image_bytes(shape_image()), "txt": caption.encode()}
    if json_bytes is not None:
        sample["json"] = json_bytes
    return sample


def _grit(coordinates: list) -> dict[str, bytes]:
    return _web(json.dumps({"noun_chunks": [[0, 7, *coordinates, 0.9]]}).encode())


def _edit(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _refer_with(folder: Path, change) -> Path:
    path = write_refer(folder, [(f"{i}.png", shape_image(), [(BOX, [f"box {i}"], "train")]) for i in range(3)])
    refs = pickle.loads(path.read_bytes())
    change(refs, folder / "instances.json")
    path.write_bytes(pickle.dumps(refs, protocol=2))
    return path


def _three(count: int = 3) -> list:
    return [(f"{i}.png", shape_image(), ["a white box"]) for i in range(count)]


def _hostile(kind: str, folder: Path) -> tuple[Path, dict, str]:
    """A source of 3 samples whose middle one (or one entry) is bad: (path, options, the problem's words)."""
    good = shape_image()
    if kind.startswith("webdataset") or kind.startswith("grit"):
        bad = {
            "webdataset .json nested 100,000 deep": (_web(DEEP), "nested 100,000 levels deep"),
            "webdataset .json with a 5,000-digit integer": (_web(HUGE_INT), "5,000 digits"),
            "webdataset .json not UTF-8": (_web(b'{"caption": "\xff"}'), "invalid UTF-8"),
            "grit noun_chunks with string coordinates": (_grit(["0.1", "0.1", "0.5", "0.5"]), "is not 4 numbers"),
            "grit noun_chunks with null coordinates": (_grit([None, 0.1, 0.5, 0.5]), "is not 4 numbers"),
        }[kind]
        return _tar(folder / "00000.tar", [_web(), bad[0], _web()]), {}, bad[1]
    if kind.startswith("coco"):
        path = write_coco_captions(folder, [(f"{i}.jpg", good, ["a white box"]) for i in range(3)])
        options = {"image_root": str(folder / "train2017")}
        changes = {
            "coco image entry a string": (lambda d: d["images"].__setitem__(1, "1.jpg"), "images[1] is a str"),
            "coco annotation a list": (lambda d: d["annotations"].append([1]), "annotations[3] is a list"),
            "coco annotation image_id a list": (
                lambda d: d["annotations"].append({"image_id": [10], "caption": "x"}),
                "is not an integer or string",
            ),
            "coco file_name a number": (lambda d: d["images"][1].__setitem__("file_name", 7), 'missing "file_name"'),
        }
        change, words = changes[kind]
        return _edit(path, change), options, words
    if kind.startswith("karpathy"):
        path = write_karpathy(folder, "flickr30k", [(f"{i}.jpg", good, "train", ["a white box"] * 5) for i in range(3)])
        changes = {
            "karpathy image entry an int": (lambda d: d["images"].__setitem__(1, 5), "images[1] is a int"),
            "karpathy sentences an int": (lambda d: d["images"][1].__setitem__("sentences", 5), "no caption"),
            "karpathy filename null": (lambda d: d["images"][1].__setitem__("filename", None), '"filename" are'),
        }
        change, words = changes[kind]
        return _edit(path, change), {}, words
    if kind.startswith("visual-genome"):
        entries = [(i, good, [(BOX, f"box {i}")]) for i in range(3)]
        path = write_visual_genome(folder, entries)
        changes = {
            "visual-genome regions a string": (lambda d: d[1].__setitem__("regions", "box"), '"regions" is a str'),
            "visual-genome region an int": (lambda d: d[1]["regions"].__setitem__(0, 5), "region 0 is a int"),
            "visual-genome region x a string": (lambda d: d[1]["regions"][0].__setitem__("x", "8"), "not 4 numbers"),
            "visual-genome id a list": (lambda d: d[1].__setitem__("id", [1]), "is not an integer or string"),
        }
        change, words = changes[kind]
        return _edit(path, change), {}, words
    if kind.startswith("refcoco"):
        options = {"image_root": str(folder / "train2014")}
        changes = {
            "refcoco ref a string": (lambda refs, _: refs.__setitem__(1, "ref"), "refs[1] is a str"),
            "refcoco image_id a dict": (lambda refs, _: refs[1].__setitem__("image_id", {}), "is not an image of"),
            "refcoco sentences a string": (lambda refs, _: refs[1].__setitem__("sentences", "x"), "no sentence"),
            "refcoco instances annotation a string": (
                lambda refs, instances: _edit(instances, lambda d: d["annotations"].__setitem__(1, "a")),
                "no [x, y",
            ),
        }
        change, words = changes[kind]
        return _refer_with(folder, change), options, words
    if kind.startswith("llava"):
        path = write_llava(folder, [(f"{i}.png", good, f"box {i}") for i in range(3)])
        changes = {
            "llava conversations an int": (lambda d: d[1].__setitem__("conversations", 5), 'no "gpt" turn'),
            "llava entry a list": (lambda d: d.__setitem__(1, []), "a list (expected a conversation object)"),
        }
        change, words = changes[kind]
        return _edit(path, change), {}, words
    raise AssertionError(kind)


HOSTILE = [
    "webdataset .json nested 100,000 deep",
    "webdataset .json with a 5,000-digit integer",
    "webdataset .json not UTF-8",
    "grit noun_chunks with string coordinates",
    "grit noun_chunks with null coordinates",
    "coco image entry a string",
    "coco annotation a list",
    "coco annotation image_id a list",
    "coco file_name a number",
    "karpathy image entry an int",
    "karpathy sentences an int",
    "karpathy filename null",
    "visual-genome regions a string",
    "visual-genome region an int",
    "visual-genome region x a string",
    "visual-genome id a list",
    "refcoco ref a string",
    "refcoco image_id a dict",
    "refcoco sentences a string",
    "refcoco instances annotation a string",
    "llava conversations an int",
    "llava entry a list",
]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_entry_follows_data_on_error_in_every_format(tmp_path, kind):
    path, options, words = _hostile(kind, tmp_path / "data")
    with pytest.raises(ValueError) as error:
        list(_stream(path, **options))
    assert words in str(error.value) and "--data-on-error skip" in str(error.value), str(error.value)
    dataset = _stream(path, on_error="skip", **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(dataset)
    # A bad COCO annotation is an entry of its own: the 3 images stay.
    assert len(items) == (3 if kind.startswith("coco annotation") else 2), [i["caption"] for i in items]
    assert dataset.skipped == 1 and any(words in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------------------- data root
def _outside(kind: str, folder: Path, value: str) -> tuple[Path, dict]:
    """A source of one good sample and one whose image path is `value` (relative to the format's root)."""
    good = shape_image()
    if kind == "coco":
        path = write_coco_captions(folder, _three(2))
        return _edit(path, lambda d: d["images"][1].__setitem__("file_name", value)), {
            "image_root": str(folder / "train2017")
        }
    if kind == "llava":
        path = write_llava(folder, [(f"{i}.png", good, "a white box") for i in range(2)])
        return _edit(path, lambda d: d[1].__setitem__("image", value)), {}
    if kind == "karpathy":
        path = write_karpathy(folder, "flickr30k", [(f"{i}.jpg", good, "train", ["a white box"]) for i in range(2)])
        return _edit(path, lambda d: d["images"][1].__setitem__("filename", value)), {}
    if kind == "visual-genome":
        path = write_visual_genome(folder, [(i, good, [(BOX, "a white box")]) for i in range(2)])
        return _edit(path, lambda d: d[1].__setitem__("id", value.removesuffix(".png"))), {}
    if kind == "refcoco":
        files = lambda refs, instances: _edit(instances, lambda d: d["images"][1].__setitem__("file_name", value))  # noqa: E731
        return _refer_with(folder, files), {"image_root": str(folder / "train2014")}
    if kind == "hf":
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder.mkdir(parents=True)
        good.save(folder / "a.png")
        path = folder / "rows.parquet"
        pq.write_table(
            pa.Table.from_pylist([{"image": "a.png", "caption": "a"}, {"image": value, "caption": "b"}]), path
        )
        return path, {}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["coco", "llava", "karpathy", "visual-genome", "refcoco", "hf"])
@pytest.mark.parametrize("how", ["../", "absolute"])
def test_every_format_refuses_paths_outside_the_data_root(tmp_path, kind, how):
    secret = tmp_path / "secret.png"
    shape_image().save(secret)
    folder = tmp_path / "data" / "inner"
    value = str(secret) if how == "absolute" else "../../../secret.png"
    path, options = _outside(kind, folder, value)
    data_format = "hf" if kind == "hf" else None
    with pytest.raises(ValueError, match="leads outside the data folder") as error:
        list(_stream(path, data_format=data_format, **options))
    assert "--allow-outside-data-root" in str(error.value)
    skipping = _stream(path, on_error="skip", data_format=data_format, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = len(list(skipping))
    assert skipping.skipped == 1
    if how == "absolute" and kind != "visual-genome":  # the opt-in reads it (a VG id gets ".jpg" appended)
        opted = _stream(path, data_format=data_format, allow_outside_data_root=True, **options)
        assert len(list(opted)) == kept + 1


def test_imagefolder_refuses_a_symlink_leading_outside(tmp_path):
    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    shape_image().save(folder / "images" / "a.png")
    shape_image().save(tmp_path / "secret.png")
    (folder / "images" / "b.png").symlink_to(tmp_path / "secret.png")
    rows = [{"file_name": "images/a.png", "caption": "a"}, {"file_name": "images/b.png", "caption": "b"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from mmgem.data.records import load_imagefolder_records

    with pytest.raises(ValueError, match="metadata row 2 .*leads outside the data folder"):
        load_imagefolder_records(folder, cache_dir=tmp_path / "cache")
    assert len(load_imagefolder_records(folder, cache_dir=tmp_path / "cache", allow_outside_data_root=True)) == 2


def test_twenty_outside_records_give_a_short_report(tmp_path):
    shape_image().save(tmp_path / "a.png")
    lines = [json.dumps({"image": f"../../../../{'x' * 200}/{i}.png", "caption": "c"}) for i in range(20)]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join([json.dumps({"image": "a.png", "caption": "c"}), *lines]) + "\n")
    with pytest.raises(ValueError) as error:
        load_jsonl_records(path)
    message = str(error.value)
    assert "20 of 21 records are invalid" in message and "... and 17 more" in message
    assert message.count("--allow-outside-data-root") == 1 and len(message) < 2000, len(message)


# ---------------------------------------------------------------------------------------------------------- caps
@pytest.mark.parametrize("gzip", [False, True])
def test_a_tar_member_over_the_cap_is_skipped_unread(tmp_path, monkeypatch, gzip):
    monkeypatch.setenv("MMGEM_MAX_IMAGE_BYTES", str(200_000))
    big = {"png": b"\0" * 48_000_000, "txt": b"too big"}  # compresses to 47 kB, as the issue's .tar.gz
    path = _tar(tmp_path / "shards" / ("00000.tar.gz" if gzip else "00000.tar"), [_web(), big, _web()], gzip)
    with pytest.raises(ValueError, match="over the 200,000 allowed"):
        list(_stream(path, data_format="webdataset"))
    dataset = _stream(path, on_error="skip", data_format="webdataset")
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            items = list(dataset)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(items) == 2 and dataset.skipped == 1
    assert peak < 3_000_000, f"{peak:,} bytes traced: the 48 MB member was read"


def test_a_huge_caption_is_clipped_before_tokenizing(tiny):
    import time

    from PIL import Image

    from mmgem.data.collator import MMGEMCollator

    _, processor = tiny
    image = Image.new("RGB", (32, 32))
    caption = ("a red circle on a blue square " * 400_000)[:12_000_000]  # 12 MB
    collator = MMGEMCollator(processor, stage=1, seed=0)
    start = time.perf_counter()
    batch = collator([{"image": image, "caption": caption, "regions": []}])
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"{elapsed:.1f} s: the caption was tokenized whole (about 4 s per MB)"
    # The same tokens as truncating a longer prefix (the whole 12 MB would take most of a minute).
    reference = processor(images=[image], text=[caption[:60_000]], truncation=True)
    assert batch["input_ids"].tolist() == reference["input_ids"].tolist()


# ---------------------------------------------------------------------------------------------------------- end to end
@pytest.mark.timeout(300)
def test_one_bad_sample_after_many_good_never_stops_a_skip_run(tmp_path):
    from mmgem.training.train import main

    samples = [_web() for _ in range(30)] + [_web(DEEP)] + [_web() for _ in range(9)]
    shards = _tar(tmp_path / "shards" / "00000.tar", samples)
    argv = [
        "--from-scratch",
        "tiny",
        "--data",
        str(shards),
        "--data-on-error",
        "skip",
        "--shuffle-buffer",
        "0",
        "--max-steps",
        "12",
        "--per_device_train_batch_size",
        "4",
        "--output-dir",
        str(tmp_path / "out"),
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
    ]
    with pytest.warns(UserWarning, match="nested 100,000 levels deep"):
        assert main(argv) == 0  # 48 samples drawn: the bad 31st is met (twice: the stream starts its next pass)
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert [row["step"] for row in log if "loss" in row] == list(range(1, 13))
