"""MTEB / MIEB: an MM-GEM through mteb's own `evaluate` on an image-text task built from a local dataset folder
(offline), with modalities image + text declared and the rule for samples that carry both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from .conftest import random_images
from .outside import saved_tiny_folder

mteb = pytest.importorskip("mteb")
pytestmark = pytest.mark.fast

LABELS = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_tiny_folder(tmp_path_factory.mktemp("mteb") / "tiny-mmgem")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A datasets `imagefolder`: test/<label>/<n>.png, three images per label."""
    root = tmp_path_factory.mktemp("shapes")
    for i, image in enumerate(random_images(9, seed=3)):
        target = root / "test" / LABELS[i % 3]
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{i}.png")
    return root


def local_zero_shot_task(root):
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.abstasks.zeroshot_classification import AbsTaskZeroShotClassification

    class LocalShapesZeroShot(AbsTaskZeroShotClassification):
        metadata = TaskMetadata(
            name="LocalShapesZeroShot",
            description="Zero-shot classification of images from a local folder.",
            reference=None,
            dataset={"path": str(root), "revision": "local"},
            type="ZeroShotClassification",
            category="i2t",
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="accuracy",
            date=None,
            domains=None,
            task_subtypes=None,
            license=None,
            annotations_creators=None,
            dialect=None,
            modalities=["image", "text"],
            sample_creation=None,
            bibtex_citation=None,
        )
        input_column_name = "image"

        def get_candidate_labels(self) -> list[str]:
            return [f"a photo of a {name}." for name in self.dataset["test"].features["label"].names]

    return LocalShapesZeroShot()


def test_mteb_evaluate_runs_an_image_text_task_offline(folder, image_folder, tmp_path, monkeypatch):
    from mmgem.integrations.mteb import load_mteb_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_mteb_model(str(folder), trust_remote_code=True, device="cpu")
    assert model.mteb_model_meta.modalities == ["image", "text"]
    task = local_zero_shot_task(image_folder)
    result = mteb.evaluate(model, [task], cache=None, show_progress_bar=False)
    accuracy = result.task_results[0].scores["test"][0]["accuracy"]

    # The same accuracy by hand: argmax cosine between each image and the label prompts.
    import datasets

    data = datasets.load_dataset(str(image_folder), split="test")
    prompts = [f"a photo of a {name}." for name in data.features["label"].names]
    with torch.no_grad():
        images = model.model.get_image_features(model.processor(images=list(data["image"]))["pixel_values"])
        texts = model.model.get_text_features(**model.processor(text=prompts))
    scores = F.normalize(images.pooler_output, dim=-1) @ F.normalize(texts.pooler_output, dim=-1).T
    expected = float((scores.argmax(-1).numpy() == np.array(data["label"])).mean())
    assert accuracy == pytest.approx(expected)


def test_samples_with_image_and_text_embed_as_the_normalised_sum(folder):
    from torch.utils.data import DataLoader

    from mmgem.integrations.mteb import load_mteb_model

    model = load_mteb_model(str(folder), trust_remote_code=True, device="cpu")
    images, texts = random_images(3), ["a red circle", "a blue square", "two stars"]
    rows = [{"image": image, "text": text} for image, text in zip(images, texts)]
    loader = DataLoader(rows, batch_size=2, collate_fn=lambda b: {k: [r[k] for r in b] for k in b[0]})

    class Meta:
        name = "pairs"

    both = model.encode(loader, task_metadata=Meta, hf_split="test", hf_subset="default", show_progress_bar=False)
    image_only = model._images(images).numpy()
    text_only = model._texts(texts).numpy()
    expected = image_only + text_only
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(both, expected, atol=1e-6)


def test_a_folder_in_the_working_directory_gets_a_name_mteb_accepts():
    from mmgem.integrations.mteb import mmgem_model_meta

    # mteb refuses names without an organization; `load_mteb_model("my-model")` must not fail on that.
    assert mmgem_model_meta("my-model").name == "local/my-model"
    assert mmgem_model_meta("you/my-model").name == "you/my-model"
