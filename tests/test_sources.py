"""Training sources in the published layouts: streaming, splitting, mixing, exact boxes, bad records, the CLI."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from mmgem.data.formats import Shard, SourceOptions
from mmgem.data.formats.detect import detect_format, open_source
from mmgem.data.sources import StreamingImageTextDataset, open_sources, steps_for_samples

from .published_layouts import (
    image_bytes,
    shape_image,
    white_box,
    write_coco_captions,
    write_karpathy,
    write_llava,
    write_refcoco_parquet,
    write_refer,
    write_shards,
    write_visual_genome,
)

BOX = (8, 4, 40, 30)  # the drawn rectangle, pixels of a 64x48 image
ONE_READER = Shard()


def _stream(spec, data_format=None, on_error="fail", epochs=1, shard=ONE_READER, stage2=True, **options):
    source = open_source(str(spec), data_format, SourceOptions(shuffle=False, **options), on_error)
    dataset = StreamingImageTextDataset([source], on_error=on_error, with_regions=stage2, epochs=epochs)
    dataset.shard = shard
    return dataset


def _web_samples(count: int) -> list[dict]:
    return [{"image": image_bytes(shape_image()), "caption": f"caption number {i}"} for i in range(count)]


# ---------------------------------------------------------------------------------------------------------- webdataset
def test_webdataset_shards_brace_expansion_and_one_pass(tmp_path):
    write_shards(tmp_path / "shards", _web_samples(10), per_shard=4)  # 00000..00002.tar
    items = list(_stream(tmp_path / "shards" / "{00000..00002}.tar"))
    assert sorted(item["caption"] for item in items) == sorted(f"caption number {i}" for i in range(10))
    assert all(item["image"].size == (64, 48) and item["image"].mode == "RGB" for item in items)
    assert detect_format(str(tmp_path / "shards" / "{00000..00002}.tar")) == "webdataset"
    assert detect_format(str(tmp_path / "shards")) == "webdataset"


def test_webdataset_is_split_by_rank_and_dataloader_worker(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards", _web_samples(16), per_shard=4)
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = _stream(tmp_path / "shards", shard=None)
        dataset.shard = None  # from RANK/WORLD_SIZE and the DataLoader worker
        loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
        seen.append([item["caption"] for item in loader])
    assert len(seen[0]) == len(seen[1]) == 8  # 4 readers (2 ranks x 2 workers), one shard each
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"caption number {i}" for i in range(16))


def test_resampled_shards_stream_endlessly_with_bounded_memory(tmp_path):
    write_shards(tmp_path / "shards", _web_samples(6), per_shard=3)
    dataset = _stream(tmp_path / "shards", epochs=None, resampled=True)
    stream = iter(dataset)
    for _ in range(100):
        next(stream)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(600):  # 100 passes over the data
        next(stream)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 2_000_000, f"memory grew by {grown} bytes over 600 samples"


def test_grit_noun_chunks_become_the_drawn_pixel_box(tmp_path):
    caption = "a white rectangle on black"
    chunk = [0, 17, BOX[0] / 64, BOX[1] / 48, BOX[2] / 64, BOX[3] / 48, 0.9]  # "a white rectangle", normalised
    sample = {
        "image": image_bytes(shape_image()),
        "caption": caption,
        "json": {"caption": caption, "noun_chunks": [chunk], "width": 64, "height": 48},
    }
    write_shards(tmp_path / "grit", [sample], per_shard=1)
    (item,) = list(_stream(tmp_path / "grit", "grit"))
    assert item["regions"] == [{"box": pytest.approx(list(BOX)), "caption": "a white rectangle"}]
    _check_box_reaches_model(item)


# ---------------------------------------------------------------------------------------------------------- regions
def _check_box_reaches_model(item, box=BOX):
    """The item's box covers exactly the drawn shape, and the box the collator hands the model covers the shape in
    the pixels the model sees (after the processor's resize and center crop), to within a pixel of resampling."""
    from mmgem.build import tiny_mmgem
    from mmgem.data.collator import MMGEMCollator

    region_box = [round(v) for v in item["regions"][0]["box"]]
    assert tuple(region_box) == white_box(item["image"]) == box
    _, processor = tiny_mmgem()
    first = {**item, "regions": item["regions"][:1]}
    batch = MMGEMCollator(processor, stage=2, unique_region_texts=False)([first])
    pixels = batch["pixel_values"][0].mean(dim=0)  # [H, W], the white shape is the bright part
    bright = pixels > (pixels.max() + pixels.min()) / 2
    rows, cols = torch.where(bright.any(dim=1))[0], torch.where(bright.any(dim=0))[0]
    seen = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
    size = torch.tensor([pixels.shape[1], pixels.shape[0]] * 2, dtype=torch.float32)
    torch.testing.assert_close(batch["boxes"][0][0] * size, seen, atol=1.0, rtol=0)


def test_visual_genome_xywh_boxes_are_exact_and_clipped_at_the_border(tmp_path):
    regions = [(list(BOX), "a white rectangle"), ([60, 40, 70, 50], "the corner")]  # second overhangs 64x48
    path = write_visual_genome(tmp_path / "vg", [(7, shape_image(), regions)])
    assert detect_format(str(path)) == "visual-genome"
    (item,) = list(_stream(path))
    assert item["regions"][1]["box"] == [60, 40, 64, 48]
    assert item["caption"] == "a white rectangle"  # the largest region's phrase
    _check_box_reaches_model(item)


def test_refer_pickle_with_instances_gives_exact_boxes_of_the_split(tmp_path):
    regions = [(list(BOX), ["the white rectangle", "white box"], "train"), ([0, 0, 4, 4], ["corner"], "val")]
    path = write_refer(tmp_path / "refcocog", [("COCO_train2014_000000000001.png", shape_image(), regions)])
    assert detect_format(str(path)) == detect_format(str(path.parent)) == "refcoco"
    (item,) = list(_stream(path, image_root=str(tmp_path / "refcocog" / "train2014")))
    assert len(item["regions"]) == 1 and item["regions"][0]["caption"] in ("the white rectangle", "white box")
    _check_box_reaches_model(item)
    (val,) = list(_stream(path, image_root=str(tmp_path / "refcocog" / "train2014"), split="val"))
    assert val["regions"] == [{"box": [0.0, 0.0, 4.0, 4.0], "caption": "corner"}]


def test_refer_pickle_that_would_run_code_is_refused(tmp_path):
    from mmgem.data.formats.refcoco import load_refer_pickle

    path = tmp_path / "refs(umd).p"
    path.write_bytes(pickle.dumps([SimpleNamespace(x=1)]))
    with pytest.raises(ValueError, match="refusing to load types.SimpleNamespace"):
        load_refer_pickle(path)


def test_refcoco_parquet_layout_bbox_xywh_and_answer_lists(tmp_path):
    path = write_refcoco_parquet(tmp_path / "refcocog" / "val.parquet", [(shape_image(), list(BOX), ["white box"])])
    assert detect_format(str(path)) == "refcoco"
    (item,) = list(_stream(path))
    assert item["caption"] == "white box"
    _check_box_reaches_model(item)


def test_hf_dataset_folder_with_column_mapping_and_regions_column(tmp_path):
    import datasets

    table = {
        "picture": [{"bytes": image_bytes(shape_image()), "path": None}],
        "text": ["a white rectangle"],
        "boxes": [[{"box": list(BOX), "caption": "the rectangle"}]],
    }
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "text": datasets.Value("string"),
            "boxes": [{"box": datasets.Sequence(datasets.Value("float64")), "caption": datasets.Value("string")}],
        }
    )
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "saved"))
    assert detect_format(str(tmp_path / "saved")) == "hf"
    with pytest.raises(ValueError, match="no column 'caption' for `--caption-column`"):
        _stream(tmp_path / "saved", image_column="picture")
    (item,) = list(_stream(tmp_path / "saved", image_column="picture", caption_column="text", regions_column="boxes"))
    assert item["caption"] == "a white rectangle"
    _check_box_reaches_model(item)


# ---------------------------------------------------------------------------------------------------------- captions
def test_llava_caption_is_the_first_gpt_turn(tmp_path):
    path = write_llava(tmp_path / "llava", [("a.png", shape_image(), "A white rectangle on a black background.")])
    assert detect_format(str(path)) == "llava"
    (item,) = list(_stream(path))
    assert item["caption"] == "A white rectangle on a black background."


def test_karpathy_training_split_is_train_plus_restval(tmp_path):
    entries = [
        (f"{split}.jpg", shape_image(), split, [f"{split} caption {k}" for k in range(5)])
        for split in ("train", "restval", "val", "test")
    ]
    path = write_karpathy(tmp_path / "coco", "coco", entries)
    assert detect_format(str(path)) == "karpathy"
    captions = sorted(item["caption"].split()[0] for item in _stream(path))
    assert captions == ["restval", "train"]
    assert [item["caption"].split()[0] for item in _stream(path, split="test")] == ["test"]


def test_coco_captions_one_sample_per_image_with_a_caption_drawn_per_epoch(tmp_path):
    path = write_coco_captions(tmp_path / "coco", [("1.jpg", shape_image(), [f"caption {k}" for k in range(5)])])
    assert detect_format(str(path)) == "coco"
    dataset = _stream(path, epochs=40, image_root=str(tmp_path / "coco" / "train2017"))
    drawn = [item["caption"] for item in dataset]
    assert len(drawn) == 40 and len(set(drawn)) >= 3  # one image per epoch, references drawn at random


def test_ambiguous_json_asks_for_the_format(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="pass `--data-format`"):
        detect_format(str(tmp_path / "x.json"))


# ---------------------------------------------------------------------------------------------------------- bad records
def _bad_fixture(kind: str, folder: Path) -> tuple[Path, dict, str]:
    """A source whose second record is bad, the options to read it, and what the error must say."""
    good, broken = shape_image(), b"not an image"
    if kind == "webdataset":
        samples = _web_samples(2)
        samples[1]["image"] = broken
        write_shards(folder, samples, per_shard=2)
        return folder, {}, "cannot read the image"
    if kind == "llava":
        return write_llava(folder, [("a.png", good, "ok"), ("missing.png", None, "gone")]), {}, "image file not found"
    if kind == "karpathy":
        entries = [("a.jpg", good, "train", ["a"] * 5), ("b.jpg", good, "train", [])]
        return write_karpathy(folder, "flickr30k", entries), {}, "no caption"
    if kind == "visual-genome":
        regions = [[(list(BOX), "ok")], [([100, 100, 120, 120], "outside")]]  # nothing left after clipping
        path = write_visual_genome(folder, [(1, good, regions[0]), (2, good, regions[1])])
        return path, {}, "zero or negative area"
    if kind == "refcoco":
        path = write_refer(
            folder, [("1.png", good, [(list(BOX), ["ok"], "train")]), ("2.png", good, [(list(BOX), [], "train")])]
        )
        return path, {"image_root": str(folder / "train2014")}, "no sentence"
    if kind == "grit":
        caption = "short"
        samples = _web_samples(2)
        samples[1]["json"] = {"noun_chunks": [[0, 50, 0.1, 0.1, 0.5, 0.5, 1.0]]}
        samples[1]["caption"] = caption
        write_shards(folder, samples, per_shard=2)
        return folder, {}, "outside the 5-character caption"
    if kind == "coco":
        path = write_coco_captions(folder, [("1.jpg", good, ["ok"]), ("2.jpg", good, ["gone"])])
        (folder / "train2017" / "2.jpg").unlink()
        return path, {"image_root": str(folder / "train2017")}, "image file not found"
    if kind == "hf":
        rows = [(good, [8, 4, 40, 30], ["ok"]), (good, [8, 4, 40, 30], ["bad image"])]
        path = write_refcoco_parquet(folder / "rows.parquet", rows)
        import pyarrow.parquet as pq

        table = pq.read_table(path).to_pylist()
        table[1]["image"] = {"bytes": broken, "path": None}
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(table), path)
        return path, {"caption_column": "file_name"}, "cannot read the image"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["webdataset", "llava", "coco", "karpathy", "visual-genome", "refcoco", "grit", "hf"])
def test_bad_records_follow_data_on_error_in_every_format(tmp_path, kind):
    path, options, message = _bad_fixture(kind, tmp_path / kind)
    data_format = kind if kind in ("grit", "hf") else None
    with pytest.raises(ValueError, match=message):
        list(_stream(path, data_format, **options))
    with pytest.warns(UserWarning, match=message):
        items = list(_stream(path, data_format, on_error="skip", **options))
    assert len(items) == 1


# ---------------------------------------------------------------------------------------------------------- mixing
def test_sources_are_mixed_by_weight(tmp_path):
    llava = write_llava(tmp_path / "llava", [(f"{i}.png", shape_image(), f"llava {i}") for i in range(3)])
    write_shards(tmp_path / "shards", _web_samples(3), per_shard=3)
    args = SimpleNamespace(
        data=f"{llava}::{tmp_path / 'shards'}",
        data_format=None,
        image_root=None,
        data_weights="3::1",
        image_column=None,
        caption_column=None,
        regions_column=None,
        data_split=None,
        data_resampled=False,
        shuffle_buffer=10,
        data_on_error="fail",
    )
    sources, weights = open_sources(args)
    assert [type(s).__name__ for s in sources] == ["ConversationSource", "WebDatasetSource"] and weights == [3, 1]
    dataset = StreamingImageTextDataset(sources, weights, epochs=None, with_regions=False)
    dataset.shard = Shard()
    stream = iter(dataset)
    drawn = [next(stream)["caption"].startswith("llava") for _ in range(400)]
    assert 0.68 < sum(drawn) / len(drawn) < 0.82  # 3:1 -> 0.75


def test_steps_for_samples_uses_the_global_batch():
    assert steps_for_samples(1000, per_device_batch=8, world_size=4, accumulation=2) == 16  # ceil(1000 / 64)
    with pytest.raises(ValueError, match="--train-num-samples"):
        steps_for_samples(0, 8, 1)


# ---------------------------------------------------------------------------------------------------------- CLI
def test_mmgem_train_streams_two_sources_with_weights_and_a_sample_count(tmp_path):
    from mmgem.training.train import main

    llava = write_llava(tmp_path / "llava", [(f"{i}.png", shape_image(), f"a white box {i}") for i in range(4)])
    write_shards(tmp_path / "shards", _web_samples(4), per_shard=2)
    output = tmp_path / "out"
    argv = [
        "--from-scratch",
        "tiny",
        "--data",
        f"{tmp_path / 'shards'}/{{00000..00001}}.tar::{llava}",
        "--data-weights",
        "1::1",
        "--train-num-samples",
        "6",
        "--per_device_train_batch_size",
        "2",
        "--output-dir",
        str(output),
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
    ]
    assert main(argv) == 0
    log = json.loads((output / "training_log.json").read_text())
    assert [row["step"] for row in log if "loss" in row] == [1, 2, 3]  # ceil(6 / 2)
    assert (output / "model.safetensors").is_file()


def test_mmgem_train_stage2_on_visual_genome(tmp_path):
    from mmgem.training.train import main

    entries = [(i, shape_image(), [(list(BOX), "a white rectangle"), ([0, 0, 8, 8], f"corner {i}")]) for i in range(2)]
    path = write_visual_genome(tmp_path / "vg", entries)
    output = tmp_path / "out"
    argv = [
        "--from-scratch",
        "tiny",
        "--data",
        str(path),
        "--stage",
        "2",
        "--max-steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--output-dir",
        str(output),
        "--save_strategy",
        "no",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1",
    ]
    assert main(argv) == 0
    assert (output / "model.safetensors").is_file()


def test_streaming_without_a_length_needs_max_steps(tmp_path):
    from mmgem.training.train import train

    llava = write_llava(tmp_path / "llava", [("a.png", shape_image(), "a white box")])
    with pytest.raises(ValueError, match="--max-steps"):
        train(from_scratch="tiny", data=str(llava), output_dir=str(tmp_path / "out"), use_cpu=True)
    with pytest.raises(ValueError, match="`--data-weights` has 1 weights for 2"):
        train(from_scratch="tiny", data=f"{llava}::{llava}", data_weights="1", output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="`data` does not exist"):
        train(from_scratch="tiny", data=f"{llava}::{tmp_path / 'nothing.json'}", output_dir=str(tmp_path / "o"))


@pytest.mark.fast
def test_streaming_runs_get_their_length_without_editing_the_caller_s_arguments(tmp_path):
    from mmgem.training.arguments import make_arguments
    from mmgem.training.train import streaming_arguments

    args = make_arguments(
        output_dir=str(tmp_path),
        data="shards",
        train_num_samples=64,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        hub_token="secret",
        use_cpu=True,
    )
    streamed = streaming_arguments(args)
    assert streamed.max_steps == 4 and streamed.accelerator_config.dispatch_batches is False
    assert streamed.hub_token == "secret"
    assert args.max_steps == -1 and args.accelerator_config.dispatch_batches is not False
    with pytest.raises(ValueError, match="`--max-steps` or `--train-num-samples`"):
        streaming_arguments(make_arguments(output_dir=str(tmp_path), data="shards", use_cpu=True))
