"""Bad input gives a ValueError that names the argument and the expected form, before any computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmgem.build import image_processor_for, tiny_configs, train_tokenizer
from modeling_mmgem import MMGEMConfig, MMGEMProcessor

from .conftest import random_images

pytestmark = pytest.mark.fast


@pytest.fixture()
def vision_calls(tiny):
    """Counts forward calls of the vision tower, to prove errors come before any work."""
    model, _ = tiny
    calls = []
    handle = model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 32, 32), r"pixel_values.*\[batch, 3, 32, 32\]"),
        ((2, 1, 32, 32), "pixel_values"),
        ((2, 3, 64, 64), "32, 32"),
    ],
)
def test_wrong_pixel_values(tiny, vision_calls, shape, match):
    model, _ = tiny
    with pytest.raises(ValueError, match=match):
        model.get_image_features(pixel_values=torch.zeros(shape))
    with pytest.raises(ValueError, match="pixel_values"):
        model.generate(pixel_values=torch.zeros(shape), max_new_tokens=2)
    assert not vision_calls


@pytest.mark.parametrize(
    "boxes, match",
    [
        ([torch.tensor([[0.0, 0.0, 1.2, 1.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])], "outside the image"),
        ([torch.tensor([[0.5, 0.5, 0.5, 0.9]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])], "zero or negative area"),
        ([torch.tensor([[math.nan, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])], "NaN"),
        ([torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])], r"shape \(1, 3\)"),
        ([torch.tensor([[0.0, 0.0, 1.0, 1.0]])], "1 box sets for 2 images"),
        ("not boxes", "list with one float tensor"),
    ],
)
def test_bad_model_boxes(tiny, vision_calls, boxes, match):
    model, processor = tiny
    pixel_values = processor(images=random_images(2))["pixel_values"]
    with pytest.raises(ValueError, match=match) as error:
        model.get_image_features(pixel_values=pixel_values, boxes=boxes)
    assert "`boxes`" in str(error.value)
    with pytest.raises(ValueError, match="`boxes`"):
        model.generate(pixel_values=pixel_values, boxes=boxes, max_new_tokens=2)
    assert not vision_calls


@pytest.mark.parametrize(
    "boxes, match",
    [
        ([[[0, 0, 60, 10]]], "outside the image"),  # image is 40 x 50
        ([[[-1, 0, 10, 10]]], "outside the image"),
        ([[[5, 5, 5, 10]]], "zero or negative area"),
        ([[[math.nan, 0, 10, 10]]], "NaN"),
        ([[[0, 0, 10]]], "shape"),
        ([[[0, 0, 10, 10]], [[0, 0, 5, 5]]], "one list of"),
        ([[[0, 0, 4, 10]]], "center crop removes"),  # 40x50 -> 32x40 -> crop rows 4..36: x fine, use y below
    ][:6],
)
def test_bad_processor_boxes(tiny, boxes, match):
    _, processor = tiny
    image = random_images(1, sizes=((40, 50),))[0]
    with pytest.raises(ValueError, match=match) as error:
        processor(images=[image], boxes=boxes)
    assert "boxes" in str(error.value)


def test_box_removed_by_center_crop(tiny):
    _, processor = tiny
    # 32 x 64 (w x h) -> shortest edge 32 -> 32 x 64 -> center crop keeps rows 16..48.
    image = random_images(1, sizes=((32, 64),))[0]
    with pytest.raises(ValueError, match="center crop removes"):
        processor(images=[image], boxes=[[[0, 0, 10, 10]]])


def test_region_text_must_match_boxes(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="region_text"):
        processor(images=random_images(1), text=["a"], boxes=[[[10, 10, 20, 20]]], region_text=[["a", "b"]])


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((5, 5, 2), dtype=np.uint8), r"images\[0\].*C in \(1, 3, 4\)"),
        (np.zeros((2, 3, 4, 4), dtype=np.uint8), r"images\[0\]"),
        ("a string", r"images\[0\].*PIL image"),
        (np.full((4, 4, 3), np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_bad_images(tiny, image, match):
    _, processor = tiny
    with pytest.raises(ValueError, match=match):
        processor(images=[image])


def test_images_in_any_mode_and_layout(tiny):
    _, processor = tiny
    pil = random_images(1)[0]
    inputs = [
        pil.convert("L"),
        pil.convert("RGBA"),
        pil.convert("P"),
        np.asarray(pil),
        np.asarray(pil).astype(np.float32) / 255.0,
        torch.from_numpy(np.asarray(pil)).permute(2, 0, 1),
        np.asarray(pil.convert("L")),
    ]
    pixel_values = processor(images=inputs)["pixel_values"]
    assert pixel_values.shape == (len(inputs), 3, 32, 32)
    torch.testing.assert_close(pixel_values[3], pixel_values[5])  # HWC numpy == CHW tensor
    torch.testing.assert_close(pixel_values[3], pixel_values[4], atol=0.02, rtol=0)  # uint8 == float in [0, 1]


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_text(tiny, text):
    _, processor = tiny
    error = TypeError if text is None else ValueError
    with pytest.raises(error, match=r"`text\[1\]` must be a non-empty string"):
        processor(text=["a red circle", text])


def test_text_longer_than_context_is_refused_or_truncated(tiny):
    model, processor = tiny
    long_text = " ".join(["red circle"] * 400)  # far beyond the 256-token context
    with pytest.raises(ValueError, match=r"`text\[0\]` has \d+ tokens.*truncation=True"):
        processor(text=[long_text])
    inputs = processor(text=[long_text], truncation=True)
    assert inputs["input_ids"].shape[1] == model.config.text_config.max_position_embeddings
    assert inputs["input_ids"][0, -1] == model.config.emb_token_id
    with torch.no_grad():
        assert model.get_text_features(**inputs).pooler_output.shape == (1, model.config.projection_dim)
    too_long = torch.full((1, 300), 5)
    with pytest.raises(ValueError, match="more than the language model's context of 256"):
        model.get_text_features(input_ids=too_long)


def test_empty_token_rows(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="`input_ids` has empty rows"):
        model.get_text_features(
            input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])
        )
    with pytest.raises(ValueError, match="`input_ids` must be an integer tensor"):
        model.get_text_features(input_ids=torch.ones(3))


def test_tokenizer_without_special_tokens_is_refused():
    tokenizer = train_tokenizer(["a red circle", "a blue star"], vocab_size=280)
    vision_config, _ = tiny_configs()
    from transformers import AutoConfig

    vision = AutoConfig.for_model(vision_config.pop("model_type"), **vision_config)
    processor = MMGEMProcessor(image_processor_for(vision), tokenizer, num_image_tokens=4)
    with pytest.raises(ValueError, match=r"`tokenizer` lacks the MM-GEM special tokens.*add_mmgem_special_tokens"):
        processor(text=["a red circle"])
    with pytest.raises(ValueError, match="add_mmgem_special_tokens"):
        processor(images=random_images(1))


def test_config_token_ids_outside_vocabulary():
    vision, text = tiny_configs()
    text["vocab_size"] = 100
    with pytest.raises(ValueError, match=r"`emb_token_id` must be an int in \[0, 100\)"):
        MMGEMConfig(vision_config=vision, text_config=text, emb_token_id=100)
    with pytest.raises(ValueError, match="must differ"):
        MMGEMConfig(vision_config=vision, text_config=text, emb_token_id=5, cap_token_id=5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pool_grid_size": 5}, r"`pool_grid_size` must be an int in \[1, 4\]"),
        ({"projection_type": "conv"}, "`projection_type` must be one of"),
        ({"vision_config": {"image_size": 30, "patch_size": 8}}, "divisible by `patch_size`"),
    ],
)
def test_bad_config_values(kwargs, match):
    vision, text = tiny_configs()
    if "vision_config" in kwargs:
        vision.update(kwargs.pop("vision_config"))
    with pytest.raises(ValueError, match=match):
        MMGEMConfig(vision_config=vision, text_config=text, **kwargs)


def test_model_without_special_token_ids_says_how_to_fix():
    from modeling_mmgem import MMGEMModel

    vision, text = tiny_configs()
    model = MMGEMModel(MMGEMConfig(vision_config=vision, text_config=text, pool_grid_size=2))
    with pytest.raises(ValueError, match=r"`config.emb_token_id` is not set.*add_mmgem_special_tokens"):
        model.get_text_features(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_caption_row_count_must_match_images_and_regions(tiny):
    model, processor = tiny
    batch = processor(images=random_images(2))
    with pytest.raises(ValueError, match=r"2 caption sequences .* with 3 images and 0 regions needs 3"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2)[:3])
    with pytest.raises(ValueError, match="`text_input_ids` has 2 rows"):
        model(
            pixel_values=batch["pixel_values"],
            text_input_ids=processor(text=["a", "b"])["input_ids"],
            boxes=[torch.tensor([[0.0, 0.0, 0.5, 0.5]])] * 2,
        )
