"""The pooling engine (`LLM(FOLDER, runner="pooling")`) against the transformers model on the same folder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmgem.embedding import encode_images, encode_regions, encode_texts
from mmgem.serving.vllm import image_prompt, text_prompt
from tests_serve.conftest import start_llm, stop_llm

TEXTS = [
    "red",
    "a small red circle on the left",
    "a large blue square on the top " * 12 + "and a yellow star",  # ~100 tokens
    "green triangle",
]
ATOL = 1e-4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def llm(folder):
    engine = start_llm(folder, "pooling")
    yield engine
    stop_llm(engine)


def vectors(outputs) -> torch.Tensor:
    return F.normalize(torch.tensor([o.outputs.embedding for o in outputs]), dim=-1)


def image_request(image, box=None) -> dict:
    request = {"prompt": image_prompt(), "multi_modal_data": {"image": image}}
    if box is not None:
        request["mm_processor_kwargs"] = {"box": box}
    return request


def test_text_embeddings_match_transformers(llm, reference):
    model, processor = reference
    expected = encode_texts(model, processor, TEXTS)
    got = vectors(llm.embed([text_prompt(t, llm.get_tokenizer()) for t in TEXTS]))
    assert got.shape == expected.shape == (len(TEXTS), model.config.projection_dim)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_text_prompt_gives_the_processor_token_layout(llm, reference):
    _, processor = reference
    tokenizer = llm.get_tokenizer()
    for text in TEXTS:
        ids = processor(text=[text])["input_ids"][0].tolist()
        assert tokenizer(text_prompt(text, tokenizer), add_special_tokens=True)["input_ids"] == ids


def test_image_embeddings_match_transformers(llm, reference, images):
    model, processor = reference
    expected = encode_images(model, processor, images)
    got = vectors(llm.embed([image_request(image) for image in images]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_mixed_batch_returns_each_request_right(llm, reference, images):
    """Texts and images interleaved in one call (one scheduler batch): each row is its own reference."""
    model, processor = reference
    text_expected = encode_texts(model, processor, TEXTS)
    image_expected = encode_images(model, processor, images)
    tokenizer = llm.get_tokenizer()
    requests, expected = [], []
    for i in range(max(len(TEXTS), len(images))):
        if i < len(images):
            requests.append(image_request(images[i]))
            expected.append(image_expected[i])
        if i < len(TEXTS):
            requests.append(text_prompt(TEXTS[i], tokenizer))
            expected.append(text_expected[i])
    torch.testing.assert_close(vectors(llm.embed(requests)), torch.stack(expected), atol=ATOL, rtol=0)


def test_region_embeddings_through_mm_processor_kwargs(llm, reference, images):
    model, processor = reference
    boxes = [[4, 2, 30, 28], [0, 0, 16, 32]]
    expected = encode_regions(model, processor, [images[0], images[2]], [[boxes[0]], [boxes[1]]])
    got = vectors(llm.embed([image_request(images[0], boxes[0]), image_request(images[2], boxes[1])]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    whole = encode_images(model, processor, [images[0]])
    assert (got[0] - whole[0]).abs().max() > 1e-3  # the box changes the vector


def test_image_request_with_text_is_refused(llm, images):
    with pytest.raises(ValueError, match="either a text or an image"):
        llm.embed([{"prompt": image_prompt() + "a red circle", "multi_modal_data": {"image": images[0]}}])


@pytest.mark.parametrize("box", [[30, 30, 10, 10], [0, 0, 500, 20]])
def test_bad_box_is_refused(llm, images, box):
    """A box that is empty or leaves the image fails the request with MMGEMProcessor's message, before any work."""
    with pytest.raises(ValueError, match="boxes"):
        llm.embed([image_request(images[0], box)])


def test_engine_still_serves_after_refused_requests(llm, reference):
    model, processor = reference
    got = vectors(llm.embed([text_prompt(TEXTS[1], llm.get_tokenizer())]))
    torch.testing.assert_close(got, encode_texts(model, processor, TEXTS[1:2]), atol=ATOL, rtol=0)
