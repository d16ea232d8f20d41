"""Evaluation: metrics on hand-made cases with known answers, the evaluation pipeline on a stub model whose
embeddings are known, and the `mmgem evaluate` command on a tiny real model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from mmgem.cli import main as cli_main
from mmgem.data.records import ImageRecord, RegionRecord
from mmgem.evaluation.evaluate import DEFAULT_TEMPLATES, evaluate_model, format_table, templates_for
from mmgem.evaluation.metrics import (
    bleu,
    caption_metrics,
    cider,
    exact_match,
    normalize_text,
    recall_at_k,
    same_text_relevance,
)

pytestmark = pytest.mark.fast


# ---------------------------------------------------------------------------------------------- retrieval
def test_recall_at_k_on_a_designed_similarity_matrix():
    # Query 0: relevant item ranked 1st; query 1: 2nd; query 2: 4th (last).
    similarity = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.8, 0.7, 0.1, 0.0], [0.5, 0.6, 0.7, 0.1]])
    relevant = torch.eye(3, 4, dtype=torch.bool)
    relevant[2] = torch.tensor([False, False, False, True])
    recall = recall_at_k(similarity, relevant, ks=(1, 2, 3, 4, 10))
    assert recall == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3), 4: 1.0, 10: 1.0}


def test_recall_counts_any_relevant_duplicate():
    captions = ["a red circle", "a blue star", "A red circle."]
    relevant = same_text_relevance(captions, captions)
    assert relevant.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    # Query 0 retrieves item 2 first: its caption equals query 0's, so it is a hit.
    similarity = torch.tensor([[0.1, 0.0, 0.9], [0.0, 1.0, 0.0], [0.0, 0.5, 0.4]])
    assert recall_at_k(similarity, relevant, ks=(1,))[1] == pytest.approx(2 / 3)


def test_recall_rejects_queries_without_answer():
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="same shape"):
        recall_at_k(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- captions
def test_normalize_text():
    assert normalize_text("  A Small, red   CIRCLE. ") == "a small red circle"


def test_exact_match_normalises_and_accepts_any_reference():
    candidates = ["A red circle.", "a blue star", "a green square"]
    references = [["a red circle"], ["a yellow star", "a blue star"], "a green cross"]
    assert exact_match(candidates, references) == pytest.approx(2 / 3)


def test_bleu4_known_values():
    reference = "a small red circle and a large green star"
    assert bleu([reference], [[reference]]) == pytest.approx(1.0)
    # One word differs ("blue"): precisions 8/9, 6/8, 5/7, 4/6 and equal lengths (no brevity penalty).
    candidate = "a small red circle and a large blue star"
    expected = (8 / 9 * 6 / 8 * 5 / 7 * 4 / 6) ** 0.25
    assert bleu([candidate], [[reference]]) == pytest.approx(expected, rel=1e-6)
    # Brevity penalty: a correct but short candidate (4 of 9 words) gets exp(1 - 9/4).
    assert bleu(["a small red circle"], [[reference]]) == pytest.approx(math.exp(1 - 9 / 4), rel=1e-6)
    # No 4-gram in common: (almost) zero, as in the COCO evaluation.
    assert bleu(["a red star is here"], [["a red star and more"]]) < 1e-3


def test_bleu_is_a_corpus_score_with_clipped_counts():
    # "the the the the": the clipped unigram count is 2 (the reference has "the" twice).
    score = bleu(["the the the the"], [["the cat on the mat"]], max_n=1)
    assert score == pytest.approx(2 / 4 * math.exp(1 - 5 / 4), rel=1e-6)


def test_cider_known_values():
    references = [["a small red circle"], ["a large blue star"], ["a small green square"]]
    perfect = [r[0] for r in references]
    assert cider(perfect, references) == pytest.approx(10.0)
    assert cider(["x y z", "x y z", "x y z"], references) == 0.0
    partial = cider(["a small red star", "a large blue star", "a small green square"], references)
    assert 0.0 < partial < 10.0


def test_cider_single_candidate_by_hand():
    # Two documents; candidate 0 = "red circle", reference 0 = "red circle", reference 1 = "blue circle".
    # Unigram idf: "red" log(2/1), "circle" log(2/2) = 0; the bigram "red circle" log 2. With only n = 1, 2 non-zero
    # and the candidate equal to its reference, n = 1 and n = 2 give cosine 1; n = 3, 4 have no n-grams (0).
    score = cider(["red circle", "blue circle"], [["red circle"], ["blue circle"]])
    assert score == pytest.approx(10.0 * (1 + 1 + 0 + 0) / 4)


def test_caption_metrics_keys_and_length_check():
    assert set(caption_metrics(["a"], ["a"])) == {"bleu4", "cider", "exact_match"}
    with pytest.raises(ValueError, match="same length"):
        exact_match(["a", "b"], ["a"])


# ---------------------------------------------------------------------------------------------- pipeline (stub)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


class StubProcessor:
    """Texts -> the index of their colour word; images -> their mean colour. Enough for the embedding tasks."""

    def __call__(self, images=None, text=None, boxes=None, truncation=False):
        if text is not None:
            ids = [[next((i for i, c in enumerate(COLOURS) if c in t), 0)] for t in text]
            return _BatchDict(input_ids=torch.tensor(ids), attention_mask=torch.ones(len(ids), 1))
        pixels = torch.stack(
            [torch.tensor(image.resize((1, 1)).getpixel((0, 0)), dtype=torch.float) for image in images]
        )
        return _BatchDict(pixel_values=pixels)


class _BatchDict(dict):
    def to(self, device):
        return self


class StubModel:
    """Image embedding: one-hot of the dominant channel; text embedding: one-hot of the colour word."""

    device = torch.device("cpu")

    def eval(self):
        return self

    def get_image_features(self, pixel_values):
        return _Output(torch.nn.functional.one_hot(pixel_values.argmax(dim=-1), 3).float())

    def get_text_features(self, input_ids, attention_mask=None):
        return _Output(torch.nn.functional.one_hot(input_ids[:, 0], 3).float())


class _Output:
    def __init__(self, pooler_output):
        self.pooler_output = pooler_output


def _records():
    records = []
    for index, colour in enumerate(["red", "green", "blue", "red"]):
        image = Image.new("RGB", (16, 16), COLOURS[colour])
        records.append(
            ImageRecord(
                image_path=image,
                caption=f"a {colour} square",
                metadata={"label": f"{colour} square"},
                regions=[RegionRecord(box=[0, 0, 8, 8], caption=f"a {colour} square")],
                line_number=index + 1,
            )
        )
    return records


def test_evaluate_model_embedding_tasks_on_a_stub_with_known_answers():
    records = _records()
    result = evaluate_model(
        StubModel(),
        StubProcessor(),
        records,
        tasks=("retrieval", "zero_shot"),
        classes=["red square", "green square", "blue square"],
        templates=["a {}", "one {}"],
        progress=False,
    )
    metrics = result.metrics
    # Images 0 and 3 are both red with the same caption: either counts, so every retrieval is right.
    for key in ("image_to_text/R@1", "text_to_image/R@1", "image_to_text/R@5", "text_to_image/R@10"):
        assert metrics[key] == 1.0
    assert metrics["zero_shot/accuracy"] == 1.0 and metrics["zero_shot/num_examples"] == 4
    assert metrics["num_images"] == 4 and metrics["num_regions"] == 4
    assert result.similarity.shape == (4, 4)
    assert "caption/bleu4" not in metrics
    table = format_table(metrics)
    assert "Zero-shot accuracy" in table and "1.000" in table


def test_zero_shot_labels_must_be_classes_and_tasks_checked():
    with pytest.raises(ValueError, match="not among the classes"):
        evaluate_model(
            StubModel(), StubProcessor(), _records(), tasks=("zero_shot",), classes=["red square"], progress=False
        )
    with pytest.raises(ValueError, match="tasks"):
        evaluate_model(StubModel(), StubProcessor(), _records(), tasks=("translation",), progress=False)


def test_templates_choice():
    assert templates_for({"sizes": ["small", "large"]}) == (["a small {}", "a large {}"], "max")
    assert templates_for({"templates": ["x {}"]}, None) == (["x {}"], "mean")
    assert templates_for(None, ["my {}"], "max") == (["my {}"], "max")
    assert templates_for(None) == (list(DEFAULT_TEMPLATES), "mean")
    with pytest.raises(ValueError, match="templates"):
        templates_for(None, ["no placeholder"])
    with pytest.raises(ValueError, match="template_reduction"):
        templates_for(None, None, "median")


def test_template_reduction_max_scores_a_class_by_its_best_prompt():
    """Class A's prompts point at two opposite objects; the image matches one of them exactly. The mean of A's
    prompts is ~0 (it loses to B's lukewarm single direction), the best prompt wins."""

    class Model(StubModel):
        def get_text_features(self, input_ids, attention_mask=None):
            table = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0.6, 0.8, 0]])  # A-small, A-large, B
            return _Output(table[input_ids[:, 0]])

    class Processor(StubProcessor):
        def __call__(self, images=None, text=None, boxes=None, truncation=False):
            if text is not None:
                ids = [[2 if t.endswith("B") else 0 if t.startswith("x") else 1] for t in text]
                return _BatchDict(input_ids=torch.tensor(ids), attention_mask=torch.ones(len(ids), 1))
            return super().__call__(images=images)

    record = _records()[0]  # red image -> image embedding [1, 0, 0]
    record.metadata["label"] = "A"
    kwargs = dict(tasks=("zero_shot",), classes=["A", "B"], templates=["x {}", "y {}"], progress=False)
    with_max = evaluate_model(Model(), Processor(), [record], template_reduction="max", **kwargs)
    with_mean = evaluate_model(Model(), Processor(), [record], template_reduction="mean", **kwargs)
    assert with_max.metrics["zero_shot/accuracy"] == 1.0 and with_mean.metrics["zero_shot/accuracy"] == 0.0


# ---------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def tiny_folder_and_data(tmp_path_factory):
    from mmgem.build import tiny_mmgem
    from mmgem.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("evaluate")
    paths = generate_dataset(root / "data", 4, 2, 6, image_size=32, seed=1, progress=False)
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model", paths


def test_evaluate_command_writes_all_metrics(tiny_folder_and_data, tmp_path, capsys):
    folder, paths = tiny_folder_and_data
    output = tmp_path / "metrics.json"
    status = cli_main(
        [
            "evaluate",
            "--model",
            str(folder),
            "--data",
            str(paths["test"]),
            "--output",
            str(output),
            "--max-new-tokens",
            "4",
            "--no-progress",
        ]
    )
    assert status == 0
    metrics = json.loads(output.read_text())
    expected = {
        "image_to_text/R@1",
        "image_to_text/R@5",
        "image_to_text/R@10",
        "text_to_image/R@1",
        "text_to_image/R@5",
        "text_to_image/R@10",
        "zero_shot/accuracy",
        "caption/bleu4",
        "caption/cider",
        "caption/exact_match",
        "region_caption/bleu4",
        "region_caption/cider",
        "region_caption/exact_match",
        "region_retrieval/R@1",
        "region_retrieval/text_to_region_R@1",
        "num_images",
        "num_regions",
    }
    assert expected <= set(metrics)
    assert metrics["num_images"] == 6
    assert all(0.0 <= metrics[k] <= 1.0 for k in expected if "R@" in k or k.endswith(("accuracy", "match")))
    printed = capsys.readouterr().out
    assert "Image -> text R@1" in printed and "Region caption" in printed


def test_evaluate_command_checks_arguments(tiny_folder_and_data, tmp_path, capsys):
    folder, paths = tiny_folder_and_data
    assert cli_main(["evaluate", "--model", str(folder), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "mmgem evaluate: error: `--data` does not exist" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", str(folder), "--data", str(paths["test"]), "--batch-size", "0"]) == 2
    assert "`--batch-size` must be a positive int" in capsys.readouterr().err
