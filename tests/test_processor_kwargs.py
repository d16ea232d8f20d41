"""transformers' standard processor options on MMGEMProcessor: image-processor options per call, tokenizer padding
and truncation, nested `text_kwargs` / `images_kwargs`, options given twice, and `model_input_names`."""

from __future__ import annotations

import json

import pytest
import torch

from modeling_mmgem.processing_mmgem import MMGEMProcessor

from .conftest import random_images

pytestmark = pytest.mark.fast
IMAGES = random_images(2, seed=5)
CAPTIONS = ["a red circle", "a small blue square on the left"]


@pytest.mark.parametrize(
    "call_options",
    [
        {"do_rescale": False},
        {"images_kwargs": {"do_rescale": False}},
        {"do_normalize": False},
        {"images_kwargs": {"do_normalize": False, "image_mean": [0.0, 0.0, 0.0]}},
    ],
)
def test_image_processor_options_reach_the_pixels(tiny, call_options):
    _, processor = tiny
    options = call_options.get("images_kwargs", call_options)
    expected = processor.image_processor(images=IMAGES, return_tensors="pt", **options)["pixel_values"]
    default = processor(images=IMAGES)["pixel_values"]
    got = processor(images=IMAGES, **call_options)["pixel_values"]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, default)
    # With a caption batch too.
    torch.testing.assert_close(processor(images=IMAGES, text=CAPTIONS, **call_options)["pixel_values"], expected)


@pytest.mark.parametrize(
    "call_options",
    [{"padding": "max_length", "max_length": 20}, {"text_kwargs": {"padding": "max_length", "max_length": 20}}],
)
def test_padding_to_max_length(tiny, call_options):
    model, processor = tiny
    pad = processor.tokenizer.pad_token_id
    texts = processor(text=CAPTIONS, **call_options)
    assert texts["input_ids"].shape == (2, 20) and texts["attention_mask"][:, -1].eq(0).all()
    reference = processor(text=CAPTIONS)
    width = reference["input_ids"].shape[1]
    assert torch.equal(texts["input_ids"][:, :width], reference["input_ids"])
    assert texts["input_ids"][:, width:].eq(pad).all()
    batch = processor(images=IMAGES, text=CAPTIONS, **call_options)
    for key in ("input_ids", "attention_mask", "labels", "text_input_ids", "text_attention_mask"):
        assert batch[key].shape == (2, 20), key
    assert batch["labels"][:, -1].eq(-100).all()
    prompts = processor(images=IMAGES, **call_options)  # caption prompts pad on the left, as generation needs
    assert prompts["input_ids"].shape == (2, 20) and prompts["attention_mask"][:, 0].eq(0).all()
    with torch.no_grad():  # the padded batch still trains: same loss as the unpadded one
        torch.testing.assert_close(model(**batch).loss, model(**processor(images=IMAGES, text=CAPTIONS)).loss)


def test_truncation_and_pad_to_multiple_of_in_text_kwargs(tiny):
    _, processor = tiny
    cut = processor(text=CAPTIONS, text_kwargs={"truncation": True, "max_length": 4})
    assert cut["input_ids"].shape[1] == 4
    with pytest.raises(ValueError, match="truncation"):
        processor(text=CAPTIONS, max_length=4)
    assert processor(text=CAPTIONS, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0


@pytest.mark.parametrize(
    "call_options",
    [
        {"images_kwargs": {"do_rescale": False}, "do_rescale": False},
        {"text_kwargs": {"padding": "longest"}, "padding": "max_length", "max_length": 20},
    ],
)
def test_an_option_given_twice_is_refused(tiny, call_options):
    _, processor = tiny
    with pytest.raises(ValueError, match="two times"):
        processor(images=IMAGES, text=CAPTIONS, **call_options)


def test_bad_options_are_refused_by_name(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text=CAPTIONS, return_tensors="np")
    with pytest.raises(ValueError, match="padding"):
        processor(text=CAPTIONS, padding="everything")
    with pytest.raises(ValueError, match="max_length"):
        processor(text=CAPTIONS, padding="max_length")


def test_model_input_names_are_what_the_call_returns(tiny):
    _, processor = tiny
    assert set(processor(images=IMAGES, text=CAPTIONS)) == set(processor.model_input_names)
    assert set(processor(text=CAPTIONS)) <= set(processor.model_input_names)
    assert set(processor(images=IMAGES)) <= set(processor.model_input_names)


def test_folders_that_name_the_context_max_length_still_load(tiny, tmp_path):
    _, processor = tiny
    processor.save_pretrained(tmp_path)
    config_file = tmp_path / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["max_length"] = config.pop("context_length")
    config_file.write_text(json.dumps(config))
    loaded = MMGEMProcessor.from_pretrained(tmp_path)
    assert loaded.context_length == processor.context_length is not None
    assert loaded.to_dict() == processor.to_dict()
