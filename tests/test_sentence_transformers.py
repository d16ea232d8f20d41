"""Every saved MM-GEM folder is also a sentence-transformers model (built-in `Transformer` + `Normalize` modules)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from transformers import AutoModel, AutoProcessor

from mmgem.build import tiny_mmgem
from mmgem.integrations.sentence_transformers import (
    MODALITY_CONFIG,
    SENTENCE_TRANSFORMERS_FILES,
    encode_regions,
    load_sentence_transformer,
    write_sentence_transformers_files,
)
from tests.conftest import random_images

TEXTS = ["a small red circle on the left", "a large blue square", "a green star on the top", "a yellow triangle"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny MM-GEM saved with save_pretrained, plus the sentence-transformers files."""
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    path = tmp_path_factory.mktemp("mmgem") / "model"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    write_sentence_transformers_files(path)
    return path


@pytest.fixture(scope="module")
def st(folder):
    return SentenceTransformer(str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def reference(folder):
    """The same folder loaded with AutoModel/AutoProcessor: the ground truth for the embeddings."""
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return model, processor


def text_features(reference, texts):
    model, processor = reference
    with torch.no_grad():
        return F.normalize(model.get_text_features(**processor(text=texts)).pooler_output, dim=-1)


def image_features(reference, images, boxes=None):
    model, processor = reference
    inputs = processor(images=images, boxes=boxes)
    with torch.no_grad():
        return F.normalize(
            model.get_image_features(inputs["pixel_values"], boxes=inputs.get("boxes")).pooler_output, dim=-1
        )


# ------------------------------------------------------------------------------------------------ files and loading
def test_folder_loads_as_transformer_plus_normalize(st, folder):
    assert [type(module) for module in st] == [Transformer, Normalize]
    assert st[0].modality_config == MODALITY_CONFIG
    assert set(st.modalities) == {"text", "image"}
    assert st.get_embedding_dimension() == 32  # projection_dim of the tiny model
    assert st.similarity_fn_name == "cosine"
    for name in SENTENCE_TRANSFORMERS_FILES:
        assert (folder / name).is_file(), name
    assert not list(folder.glob(".*.tmp")), "temporary files left behind"


def test_written_files_match_what_sentence_transformers_saves(st, folder, tmp_path):
    st.save(str(tmp_path / "saved"))
    for name in SENTENCE_TRANSFORMERS_FILES:
        ours = json.loads((folder / name).read_text())
        theirs = json.loads((tmp_path / "saved" / name).read_text())
        assert ours == theirs, name


def test_write_is_idempotent_and_keeps_transformers_files(folder):
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors",)}
    write_sentence_transformers_files(folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors",)}
    assert before == after and before


def test_write_rejects_bad_arguments_before_writing(tmp_path, folder):
    with pytest.raises(ValueError, match="model_dir"):
        write_sentence_transformers_files(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_dir"):
        write_sentence_transformers_files(tmp_path / "other")
    assert not (tmp_path / "other" / "modules.json").exists()
    with pytest.raises(ValueError, match="similarity_fn_name"):
        write_sentence_transformers_files(folder, similarity_fn_name="jaccard")
    with pytest.raises(ValueError, match="default_prompt_name"):
        write_sentence_transformers_files(folder, prompts={"query": "q: "}, default_prompt_name="passage")


def test_load_sentence_transformer_adds_files_to_a_plain_folder(tmp_path, reference):
    torch.manual_seed(1)
    model, processor = tiny_mmgem()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "modules.json").exists()
    st = load_sentence_transformer(tmp_path)
    assert (tmp_path / "modules.json").exists()
    with torch.no_grad():
        expected = F.normalize(model.eval().get_text_features(**processor(text=TEXTS)).pooler_output, dim=-1)
    np.testing.assert_allclose(st.encode(TEXTS), expected.numpy(), atol=ATOL)


# ------------------------------------------------------------------------------------------------ encoding
def test_text_embeddings_equal_normalised_get_text_features(st, reference):
    expected = text_features(reference, TEXTS)
    for batch_size in (1, 3, 32):  # padding and batch composition must not matter
        got = st.encode(TEXTS, batch_size=batch_size, convert_to_tensor=True)
        assert isinstance(got, torch.Tensor) and got.shape == (len(TEXTS), 32)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    single = st.encode(TEXTS[0])  # a single string gives one vector
    np.testing.assert_allclose(single, expected[0].numpy(), atol=ATOL)


def test_image_embeddings_equal_normalised_get_image_features(st, reference):
    images = random_images(5, seed=3)
    expected = image_features(reference, images)
    got = st.encode(images, batch_size=2, show_progress_bar=True)
    assert isinstance(got, np.ndarray) and got.shape == (5, 32)
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_strings_are_never_opened_as_files_or_urls(st, reference, tmp_path):
    # sentence-transformers reads a string ending in .png that names an existing file (or an http URL ending in
    # .png) as an image; the module config makes the processor refuse it instead of reading the file.
    secret = tmp_path / "secret.png"
    random_images(1, seed=4)[0].save(secret)
    with pytest.raises(ValueError, match="does not open files or URLs"):
        st.encode([str(secret)])
    with pytest.raises(ValueError, match="does not open files or URLs"):
        st.encode(["http://127.0.0.1:9/never-fetched.png"])
    # Such a string embeds as a text when marked as one, and a string that names no file is a text anyway.
    as_text = st.encode([{"text": str(secret)}])
    reference_text = text_features(reference, [str(secret)]).numpy()
    np.testing.assert_allclose(as_text, reference_text, atol=ATOL)
    assert st.encode([str(tmp_path / "missing.png")]).shape == (1, 32)


def test_long_texts_are_truncated_like_any_sentence_transformer(st):
    long_text = " ".join(["a small red circle on the left"] * 200)  # far more tokens than the 256-token context
    embedding = st.encode([long_text])
    assert embedding.shape == (1, 32) and np.isfinite(embedding).all()
    # The same as the text cut to the context by the processor itself.
    cut = st[0].processor(text=[long_text], truncation=True)
    model = st[0].model
    with torch.no_grad():
        expected = F.normalize(model.get_text_features(**cut).pooler_output, dim=-1)
    np.testing.assert_allclose(embedding, expected.numpy(), atol=ATOL)


def test_similarity_and_ranking(st):
    texts = st.encode(TEXTS, convert_to_tensor=True)
    images = st.encode(random_images(3), convert_to_tensor=True)
    scores = st.similarity(texts, images)
    assert scores.shape == (len(TEXTS), 3)
    torch.testing.assert_close(scores, texts @ images.T, atol=ATOL, rtol=0)  # unit vectors: cosine == dot
    pairwise = st.similarity_pairwise(texts[:3], images)
    torch.testing.assert_close(pairwise, (texts[:3] * images).sum(-1), atol=ATOL, rtol=0)


def test_encode_query_and_document(st, folder, tmp_path):
    plain = st.encode(TEXTS)
    np.testing.assert_allclose(st.encode_query(TEXTS), plain, atol=ATOL)  # MM-GEM has no instruction prompts
    np.testing.assert_allclose(st.encode_document(TEXTS), plain, atol=ATOL)
    images = random_images(2)
    np.testing.assert_allclose(st.encode_document(images), st.encode(images), atol=ATOL)

    # Prompts, when configured, are prepended to texts only.
    prompted = tmp_path / "prompted"
    prompted.mkdir()
    for path in folder.iterdir():
        if path.is_file():
            (prompted / path.name).write_bytes(path.read_bytes())
    write_sentence_transformers_files(prompted, prompts={"query": "find: ", "document": ""})
    st_prompted = SentenceTransformer(str(prompted), trust_remote_code=True)
    np.testing.assert_allclose(
        st_prompted.encode_query(TEXTS), st.encode(["find: " + text for text in TEXTS]), atol=ATOL
    )
    np.testing.assert_allclose(st_prompted.encode_document(TEXTS), plain, atol=ATOL)
    np.testing.assert_allclose(st_prompted.encode_query(images), st.encode(images), atol=ATOL)


def test_truncate_dim(st):
    full = st.encode(TEXTS)
    short = st.encode(TEXTS, truncate_dim=8)
    assert short.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(short, full[:, :8], atol=ATOL)
    images = random_images(2)
    np.testing.assert_allclose(st.encode(images, truncate_dim=8), st.encode(images)[:, :8], atol=ATOL)


def test_information_retrieval_evaluator_over_image_caption_pairs(st):
    images = random_images(4, seed=7)
    queries = {f"q{i}": text for i, text in enumerate(TEXTS)}
    corpus = {f"d{i}": image for i, image in enumerate(images)}
    relevant = {f"q{i}": {f"d{i}"} for i in range(4)}
    evaluator = InformationRetrievalEvaluator(
        queries,
        corpus,
        relevant,
        name="tiny",
        mrr_at_k=[4],
        ndcg_at_k=[4],
        accuracy_at_k=[1, 4],
        precision_recall_at_k=[1],
        map_at_k=[4],
    )
    results = evaluator(st)
    assert results["tiny_cosine_accuracy@4"] == 1.0  # every relevant image is among the 4
    assert 0.0 <= results["tiny_cosine_ndcg@4"] <= 1.0
    assert results[evaluator.primary_metric] == results["tiny_cosine_ndcg@4"]


# ------------------------------------------------------------------------------------------------ save / push
def test_save_and_reload(st, tmp_path, reference):
    st.save(str(tmp_path / "again"))
    reloaded = SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True)
    images = random_images(2)
    np.testing.assert_allclose(reloaded.encode(TEXTS), st.encode(TEXTS), atol=ATOL)
    np.testing.assert_allclose(reloaded.encode(images), st.encode(images), atol=ATOL)
    # The folder is still a transformers model folder.
    model = AutoModel.from_pretrained(tmp_path / "again", trust_remote_code=True)
    assert type(model).__name__ == "MMGEMModel"


def test_a_saved_folder_with_the_sentence_transformers_files_loads_in_both(tmp_path, reference):
    model, processor = reference
    model.save_pretrained(tmp_path / "out")
    processor.save_pretrained(tmp_path / "out")
    write_sentence_transformers_files(tmp_path / "out")
    st = SentenceTransformer(str(tmp_path / "out"), trust_remote_code=True)
    np.testing.assert_allclose(st.encode(TEXTS), text_features(reference, TEXTS).numpy(), atol=ATOL)


def test_push_to_hub_and_load_by_repo_id(st, fake_hub, tmp_path):
    with fake_hub.patch(token=True, cache_dir=tmp_path / "hf-cache"):
        st.push_to_hub("user/tiny-mmgem-st")
        assert "modules.json" in fake_hub.files("user/tiny-mmgem-st")
        pulled = SentenceTransformer("user/tiny-mmgem-st", trust_remote_code=True)
        images = random_images(2)
        np.testing.assert_allclose(pulled.encode(TEXTS), st.encode(TEXTS), atol=ATOL)
        np.testing.assert_allclose(pulled.encode(images), st.encode(images), atol=ATOL)


# ------------------------------------------------------------------------------------------------ regions
def test_encode_regions_matches_region_features_and_shares_the_space(st, reference):
    images = random_images(3, seed=5, sizes=((32, 32),))  # 32 px: the model frame is the original image
    boxes = [[[0, 0, 16, 16], [8, 8, 32, 24]], [[0, 0, 32, 32]], [[4, 4, 20, 30]]]
    expected = image_features(reference, images, boxes)
    got = encode_regions(st, images, boxes, batch_size=2)
    assert got.shape == (4, 32)
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL)
    # The whole-image box of image 1 gives that image's embedding: regions and images share one space.
    np.testing.assert_allclose(got[2], st.encode(images[1]), atol=ATOL)
    # Same from the transformers model + processor, as a tensor, truncated like sentence-transformers does.
    model, processor = reference
    truncated = encode_regions(model, images, boxes, processor=processor, convert_to_tensor=True, truncate_dim=8)
    torch.testing.assert_close(truncated, expected[:, :8], atol=ATOL, rtol=0)
    scores = st.similarity(st.encode(TEXTS, convert_to_tensor=True), torch.as_tensor(got))
    assert scores.shape == (len(TEXTS), 4)


def test_encode_regions_takes_paths_and_rejects_bad_input(st, reference, tmp_path):
    image = random_images(1, sizes=((40, 30),))[0]
    image.save(tmp_path / "x.png")
    boxes = [[[0, 0, 20, 15]]]
    np.testing.assert_allclose(
        encode_regions(st, [str(tmp_path / "x.png")], boxes), encode_regions(st, [image], boxes), atol=ATOL
    )
    with pytest.raises(ValueError, match="boxes"):
        encode_regions(st, [image], [])
    with pytest.raises(ValueError, match="boxes"):
        encode_regions(st, [image], [[]])
    with pytest.raises(ValueError, match="processor"):
        encode_regions(reference[0], [image], boxes)
    with pytest.raises(ValueError, match="images"):
        encode_regions(st, [str(tmp_path / "missing.png")], boxes)
