"""`mmgem evaluate --benchmark`: each benchmark read from a fixture in its published layout, metrics against hand
computations, the embedding cache, the tables, and the command as a user types it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmgem.embedding import pad_to_square
from mmgem.evaluation.benchmarks import BenchmarkOptions, format_benchmark_tables, load_benchmark
from mmgem.evaluation.metrics import bleu, cider
from mmgem.evaluation.tasks import EmbeddingCache, RetrievalTask, ZeroShotTask, coco_caption_scores

from .published_layouts import shape_image, white_box, write_karpathy, write_llava, write_refer


class StubCache:
    """Embeddings chosen by the test: `vectors[item]` for an image path or a text."""

    def __init__(self, vectors):
        self.vectors = vectors

    def images(self, images):
        return torch.nn.functional.normalize(torch.stack([self.vectors[i] for i in images]), dim=-1)

    texts = images


def _karpathy_fixture(folder, dataset="flickr30k", count=3):
    entries = [
        (f"{i}.jpg", shape_image(grey=20 * i), "test", [f"image {i} caption {k}" for k in range(5)])
        for i in range(count)
    ] + [("train.jpg", shape_image(), "train", ["train"] * 5)]
    return write_karpathy(folder, dataset, entries)


# ---------------------------------------------------------------------------------------------------------- retrieval
def test_karpathy_retrieval_reads_the_test_split_with_five_captions_each(tmp_path):
    _karpathy_fixture(tmp_path)
    task = load_benchmark("flickr30k", tmp_path)
    assert [p.split("/")[-1] for p in task.images] == ["0.jpg", "1.jpg", "2.jpg"]
    assert len(task.texts) == 15 and task.text_image == [0] * 5 + [1] * 5 + [2] * 5


def test_retrieval_recall_matches_a_hand_computation():
    # 2 images, 2 captions each. Image a is closest to b's captions; image b to its own second caption.
    e = torch.eye(3)
    vectors = {
        "a": e[0],
        "b": e[1],
        "a1": e[1] + 0.1 * e[2],
        "a2": e[0] + 0.5 * e[1],  # a2 is a's best own caption, ranked 2nd for a
        "b1": e[1] + 0.2 * e[2],
        "b2": e[1] + 0.01 * e[2],
    }
    task = RetrievalTask("toy", ["a", "b"], ["a1", "a2", "b1", "b2"], [0, 0, 1, 1], ks=(1, 2))
    metrics = task.run(StubCache(vectors))
    # image a ranks a2 (0.89) > b2, a1, b1 (all ~0): hit at 1. image b ranks b2 (0.99995) first: hit at 1.
    assert metrics["toy/image_to_text/R@1"] == 1.0
    # texts: a1 -> b (0.995) before a: miss at 1, hit at 2; a2 -> a: hit; b1, b2 -> b: hit. R@1 = 3/4.
    assert metrics["toy/text_to_image/R@1"] == 0.75 and metrics["toy/text_to_image/R@2"] == 1.0


# ---------------------------------------------------------------------------------------------------------- zero-shot
def test_zero_shot_averages_templates_and_reports_top1_top5():
    e = torch.eye(6)
    vectors = {f"{t} {c}": e[i] + (0.3 * e[5] if t == "b" else 0) for i, c in enumerate("pqrst") for t in "ab"}
    vectors.update({"x": e[0], "y": e[1] + 1.2 * e[2], "z": e[3]})  # y is of class q but looks more like r
    task = ZeroShotTask("toy", ["x", "y", "z"], [0, 1, 3], list("pqrst"), ["a {}", "b {}"])
    metrics = task.run(StubCache(vectors))
    assert metrics["toy/top1"] == pytest.approx(2 / 3) and metrics["toy/top5"] == 1.0


def test_imagenet_uses_openai_names_in_wordnet_id_order_and_80_templates(tmp_path):
    from mmgem.evaluation.templates import IMAGENET_CLASSES, IMAGENET_TEMPLATES

    assert len(IMAGENET_CLASSES) == 1000 and len(IMAGENET_TEMPLATES) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    wnids = [f"n{index:08d}" for index in range(1000)]
    for wnid in wnids:
        (tmp_path / "val" / wnid).mkdir(parents=True)
    shape_image().save(tmp_path / "val" / wnids[1] / "ILSVRC2012_val_00000001.JPEG", format="JPEG")
    task = load_benchmark("imagenet", tmp_path)
    assert task.classes[1] == "goldfish" and task.labels == [1] and task.templates == list(IMAGENET_TEMPLATES)
    (tmp_path / "val" / wnids[0]).rmdir()
    with pytest.raises(ValueError, match="expected the 1,000 WordNet-id folders"):
        load_benchmark("imagenet", tmp_path)


def test_imagefolder_class_names_and_override_files(tmp_path):
    for name in ("golden_retriever", "tabby_cat"):
        (tmp_path / name).mkdir()
        shape_image().save(tmp_path / name / "1.png")
    task = load_benchmark("imagefolder", tmp_path)
    assert task.classes == ["golden retriever", "tabby cat"] and task.templates == ["a photo of a {}."]
    (tmp_path / "classes.json").write_text(json.dumps({"golden_retriever": "dog", "tabby_cat": "cat"}))
    (tmp_path / "templates.txt").write_text("a {}.\nart of a {}.\n")
    (tmp_path / "classes.json").rename(tmp_path.parent / "classes.json")
    (tmp_path / "templates.txt").rename(tmp_path.parent / "templates.txt")
    options = BenchmarkOptions(
        classes=str(tmp_path.parent / "classes.json"), templates=str(tmp_path.parent / "templates.txt")
    )
    task = load_benchmark("imagefolder", tmp_path, options)
    assert task.classes == ["dog", "cat"] and task.templates == ["a {}.", "art of a {}."]


# ---------------------------------------------------------------------------------------------------------- long text
def test_long_text_benchmarks_read_their_layouts(tmp_path):
    urban = tmp_path / "urban1k"
    (urban / "image").mkdir(parents=True)
    (urban / "caption").mkdir()
    for n in (1, 2, 10):
        shape_image().save(urban / "image" / f"{n}.jpg")
        (urban / "caption" / f"{n}.txt").write_text(f"a long caption {n}\n")
    task = load_benchmark("urban1k", urban)
    assert task.texts == ["a long caption 1", "a long caption 2", "a long caption 10"] and task.text_image == [0, 1, 2]

    docci = tmp_path / "docci"
    (docci / "images").mkdir(parents=True)
    rows = [
        {"example_id": f"{s}_{i}", "split": s, "image_file": f"{s}_{i}.jpg", "description": f"{s} {i}"}
        for s in ("train", "test")
        for i in range(2)
    ]
    for row in rows:
        shape_image().save(docci / "images" / row["image_file"])
    (docci / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_benchmark("docci", docci).texts == ["test 0", "test 1"]

    dci = tmp_path / "dci"
    (dci / "annotations").mkdir(parents=True)
    (dci / "photos").mkdir()
    shape_image().save(dci / "photos" / "sa_1.jpg")
    (dci / "annotations" / "sa_1.json").write_text(
        json.dumps({"image": "sa_1.jpg", "short_caption": "A box.", "extra_caption": "It is white.", "mask_data": {}})
    )
    assert load_benchmark("dci", dci).texts == ["A box. It is white."]

    share = tmp_path / "sharegpt4v"
    write_llava(share, [(f"{i}.png", shape_image(), f"detailed {i}") for i in range(3)])
    task = load_benchmark("sharegpt4v-1k", share)
    assert task.texts == ["detailed 0", "detailed 1", "detailed 2"]
    (urban / "caption" / "2.txt").unlink()
    with pytest.raises(ValueError, match="unmatched"):
        load_benchmark("urban1k", urban)


# ---------------------------------------------------------------------------------------------------------- captions
@pytest.mark.slow  # Java (PTB tokenizer, METEOR) starts slowly on busy shared cores
def test_coco_caption_scores_match_hand_computations():
    references = [["a white box on black", "a box"], ["two red circles"]]
    candidates = ["a white box on black", "two red circles"]
    scores = coco_caption_scores(candidates, references)
    # Perfect captions: BLEU-4 = 1; CIDEr-D of each = 10 * mean over references of its n-gram cosine (1 with the
    # identical one; with "a box": cosines for n = 1..4 and the length penalty exp(-9/72), computed below).
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] == pytest.approx(cider(candidates, references), rel=1e-6)
    assert "meteor" in scores["ran"] and scores["meteor"] > 0.9
    assert "spice" not in scores["ran"] and "Stanford CoreNLP" in scores["skipped"]["spice"]
    # PTB tokenisation lower-cases and drops punctuation: the same texts as the project's normalisation.
    noisy = ["A man, riding a horse!", "dogs in the snow"]
    refs = [["a man is riding a horse", "A person rides a horse."], ["Two dogs play in the snow."]]
    scores = coco_caption_scores(noisy, refs)
    assert scores["bleu4"] == pytest.approx(bleu(noisy, refs), rel=1e-6)
    assert scores["cider"] == pytest.approx(cider(noisy, refs), rel=1e-6)


def test_hand_cider_of_perfect_captions():
    # Two documents sharing no n-gram: every n-gram has idf log(2), and a perfect candidate's cosine with its
    # reference is 1 for each n-gram order it has. Four words: orders 1..4 -> 10 * mean(1, 1, 1, 1) = 10; two words:
    # only orders 1 and 2 exist -> 10 * mean(1, 1, 0, 0) = 5.
    four = (["a b c d", "e f g h"], [["a b c d"], ["e f g h"]])
    two = (["a b", "c d"], [["a b"], ["c d"]])
    assert coco_caption_scores(*four, meteor=False)["cider"] == pytest.approx(10.0)
    assert coco_caption_scores(*two, meteor=False)["cider"] == pytest.approx(5.0)


# ---------------------------------------------------------------------------------------------------------- regions
def test_region_boxes_survive_the_center_crop_exactly():
    image = shape_image(size=(64, 48), box=(50, 4, 64, 30))  # at the right edge: a center crop would cut it away
    padded, (box,) = pad_to_square(image, [[50, 4, 64, 30]])
    assert padded.size == (64, 64) and white_box(padded) == tuple(box) == (50, 12, 64, 38)


def test_refcocog_refer_layout_groups_regions_by_image(tmp_path):
    regions = [
        ([8, 4, 40, 30], ["the white box", "a box"], "val"),
        ([0, 0, 4, 4], ["corner"], "val"),
        ([1, 1, 5, 5], ["train ref"], "train"),
    ]
    write_refer(tmp_path, [("COCO_train2014_000000000001.png", shape_image(), regions)])
    task = load_benchmark("refcocog", tmp_path)
    assert len(task.images) == 1 and task.boxes == [[[8.0, 4.0, 40.0, 30.0], [0.0, 0.0, 4.0, 4.0]]]
    assert task.sentences == [["the white box", "a box"], ["corner"]]


# ---------------------------------------------------------------------------------------------------------- cache, CLI
def test_cache_embeds_an_image_set_once_across_tasks_and_runs(tmp_path, tiny):
    model, processor = tiny
    _karpathy_fixture(tmp_path / "data")
    task = load_benchmark("flickr30k", tmp_path / "data")
    cache = EmbeddingCache(model, processor, tmp_path / "cache", batch_size=2, progress=False)
    first = task.run(cache)
    assert cache.computed["images"] == 3 and cache.computed["texts"] == 15
    again = task.run(cache)
    assert again == first and cache.computed["images"] == 3
    fresh = EmbeddingCache(model, processor, tmp_path / "cache", batch_size=2, progress=False)
    assert task.run(fresh) == first and fresh.computed == {"images": 0, "texts": 0, "regions": 0, "captions": 0}
    # The metrics equal a brute-force ranking of the same embeddings.
    images, texts = cache.images(task.images), cache.texts(task.texts)
    similarity = images @ texts.t()
    hits = [any(j // 5 == i for j in similarity[i].argsort(descending=True)[:1].tolist()) for i in range(3)]
    assert first["flickr30k/image_to_text/R@1"] == pytest.approx(sum(hits) / 3)


@pytest.mark.slow  # Java (PTB tokenizer, METEOR) starts slowly on busy shared cores
def test_mmgem_evaluate_benchmarks_from_the_command_line(tmp_path, tiny, capsys):
    from mmgem.evaluation.evaluate import main

    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    _karpathy_fixture(tmp_path / "coco", "coco")
    regions = [([8, 4, 40, 30], ["the white box"], "val"), ([0, 0, 4, 4], ["corner"], "val")]
    write_refer(tmp_path / "refcocog", [("COCO_train2014_000000000001.png", shape_image(), regions)])
    output = tmp_path / "metrics.json"
    argv = [
        "--model",
        str(tmp_path / "model"),
        "--benchmark",
        "coco",
        "coco-captions",
        "refcocog",
        "--data-dir",
        str(tmp_path / "coco"),
        str(tmp_path / "coco"),
        str(tmp_path / "refcocog"),
        "--output",
        str(output),
        "--no-progress",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "4",
    ]
    assert main(argv) == 0
    metrics = json.loads(output.read_text())
    assert {
        "coco/image_to_text/R@10",
        "coco/text_to_image/R@1",
        "coco-captions/cider",
        "coco-captions/meteor",
        "refcocog/region_caption/cider",
        "refcocog/text_to_region/R@1",
    } <= set(metrics)
    assert metrics["coco/image_to_text/R@10"] == 1.0  # 3 images, 15 captions: every image's captions in the top 10
    assert metrics["coco-captions/caption_metrics"] == ["bleu4", "cider", "meteor"]
    table = capsys.readouterr().out
    assert "COCO I→T R@1" in table and "| B@4 | M" in table and "RefCOCOg" in table
    with pytest.raises(ValueError, match="one folder per `--benchmark`"):
        main(["--model", str(tmp_path / "model"), "--benchmark", "coco", "dci", "--data-dir", str(tmp_path)])


def test_tables_use_the_papers_columns():
    metrics = {f"flickr30k/{d}/R@{k}": 0.5 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    metrics.update(
        {
            "urban1k/image_to_text/R@1": 0.8125,
            "urban1k/text_to_image/R@1": 0.75,
            "imagenet/top1": 0.7,
            "imagenet/top5": 0.9,
            "coco-captions/bleu4": 0.4,
            "coco-captions/cider": 1.367,
        }
    )
    text = format_benchmark_tables(metrics, "m")
    assert "| Model | Flickr30K I→T R@1 | Flickr30K I→T R@5 |" in text
    assert "| m     | 50.0" in text and "Urban1k I2T | Urban1k T2I" in text and "81.2" in text
    assert "136.7" in text and "| -" in text  # CIDEr x 100; METEOR/SPICE absent shown as "-"
    assert not math.isnan(0.0)
