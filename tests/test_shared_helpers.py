"""The helpers that every part of MM-GEM shares: one image loader, one box check, one caption-row layout."""

from __future__ import annotations

import base64
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mmgem.data.records import ImageRecord, _box_problem
from mmgem.integrations.sentence_transformers import encode_regions
from modeling_mmgem.image_loading_mmgem import box_problem, load_rgb_image
from tests.conftest import random_images

pytestmark = pytest.mark.fast


def _transparent_png(tmp_path):
    """A 40x40 PNG: an opaque red square on a fully transparent (black, alpha 0) background."""
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[10:30, 10:30] = (255, 0, 0, 255)
    path = tmp_path / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


# ------------------------------------------------------------------------------------------ image loader
def test_transparency_is_composited_onto_white_whatever_the_input_form(tmp_path):
    path = _transparent_png(tmp_path)
    pil = Image.open(path)
    encoded = base64.b64encode(path.read_bytes()).decode()
    forms = {
        "path": str(path),
        "pathlike": path,
        "pil": pil,
        "base64": encoded,
        "data url": f"data:image/png;base64,{encoded}",
        "array": np.asarray(pil),
        "record": ImageRecord(image_path=str(path), caption="c").load_image(),
        "in-memory record": ImageRecord(image_path=None, image=pil.copy(), caption="c").load_image(),
    }
    expected = np.full((40, 40, 3), 255, dtype=np.uint8)
    expected[10:30, 10:30] = (255, 0, 0)
    for name, form in forms.items():
        assert np.array_equal(np.asarray(load_rgb_image(form)), expected), name


@pytest.mark.parametrize(
    "mode",
    [
        "1",
        "L",
        "P",
        "RGB",
        "RGBA",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "I",
        "F",
        "LA",
        "PA",
        "La",
        "RGBa",
        "RGBX",
        "I;16",
        "I;16B",
    ],
)
def test_every_pil_mode_loads_as_rgb(mode):
    image = load_rgb_image(Image.new(mode, (5, 3)))
    assert image.mode == "RGB" and image.size == (5, 3)


def test_wide_grey_images_are_rescaled_not_clipped():
    ramp = np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4)
    grey = np.asarray(load_rgb_image(Image.fromarray(ramp)))[..., 0]
    np.testing.assert_array_equal(grey, np.rint(ramp / 257).astype(np.uint8))
    floats = np.asarray(load_rgb_image(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))))
    assert (floats == 128).all()


def test_a_missing_path_names_the_image():
    with pytest.raises(ValueError, match=r"`images\[3\]`.*'missing.png' is not an existing file"):
        load_rgb_image("missing.png", 3)


def test_region_embeddings_of_a_transparent_png_agree_between_the_processor_and_encode_regions(tiny, tmp_path):
    """Given by path, by PIL image or straight to the processor: the same pixels, so the same region embeddings."""
    model, processor = tiny
    path = _transparent_png(tmp_path)
    boxes = [[[5, 5, 35, 35]]]
    by_path = encode_regions(model, [str(path)], boxes, processor=processor, convert_to_tensor=True)
    by_pil = encode_regions(model, [Image.open(path)], boxes, processor=processor, convert_to_tensor=True)
    inputs = processor(images=[str(path)], boxes=boxes)
    with torch.no_grad():
        direct = model.get_image_features(inputs["pixel_values"], boxes=inputs["boxes"]).pooler_output
    torch.testing.assert_close(by_path, by_pil)
    torch.testing.assert_close(by_path, torch.nn.functional.normalize(direct, dim=-1))


# ------------------------------------------------------------------------------------------ boxes
BOX_CASES = {
    "good": ([1, 2, 10, 12], None),
    "zero area": ([5, 5, 5, 9], "has zero or negative area"),
    "inverted": ([5, 9, 8, 2], "has zero or negative area"),
    "outside": ([0, 0, 33, 10], "is outside the 32x24 image"),
    "negative": ([-1, 0, 5, 5], "is outside the 32x24 image"),
    "nan": ([0, 0, float("nan"), 5], "contains NaN or inf"),
    "text": ([0, 0, "5", 5], "is not 4 numbers"),
    "bool": ([0, 0, True, 5], "is not 4 numbers"),
}


@pytest.mark.parametrize("name", BOX_CASES)
def test_records_processor_and_model_apply_the_same_box_rule(tiny, name):
    """The data records, the processor (pixel boxes) and the model (normalised boxes) refuse the same boxes."""
    model, processor = tiny
    box, problem = BOX_CASES[name]
    assert box_problem(box, 32, 24, "32x24 image") == problem
    record_problem = _box_problem(box, (32, 24))
    image = Image.new("RGB", (32, 24))
    if problem is None:
        assert record_problem is None
        inputs = processor(images=[image], boxes=[[box]])
        model.get_image_features(inputs["pixel_values"], boxes=inputs["boxes"])
        return
    assert problem in record_problem
    with pytest.raises(ValueError, match=problem.split(" the ")[0]):
        processor(images=[image], boxes=[[box]])
    if all(isinstance(v, float | int) and not isinstance(v, bool) for v in box):
        normalised = torch.tensor([[box[0] / 32, box[1] / 24, box[2] / 32, box[3] / 24]])
        with pytest.raises(ValueError, match=problem.split(" the ")[0]):
            model.get_image_features(torch.zeros(1, 3, 32, 32), boxes=[normalised])


def test_box_rule_on_python_numbers_matches_the_rule_on_tensors():
    """Boxes given as Python numbers are checked without a tensor; the answer is the tensor check's, box for box."""
    generator = random.Random(0)
    values = [-1, 0, 1, 5, 9.5, 10, 10.5, 11, 3.3, float("nan"), float("inf"), 10**60]
    cases = [[generator.choice(values) for _ in range(4)] for _ in range(300)]
    cases += [[[generator.choice(values) for _ in range(4)] for _ in range(3)] for _ in range(300)]
    cases += [[], [0, 0, 1], (0, 0, 3, 3), [(0, 0, 3, 3)], [[0, 0, 3, 3, 3]]]
    for boxes in cases:
        for size, tolerance in (((10, 10), 0.0), ((10, 10), 0.6), ((None, None), 0.0)):
            plain = box_problem(boxes, *size, "image", tolerance=tolerance)
            as_tensor = box_problem(torch.tensor(boxes, dtype=torch.float64), *size, "image", tolerance=tolerance)
            assert plain == as_tensor, (boxes, size, tolerance)


# ------------------------------------------------------------------------------------------ caption rows
def _region_batch(processor, images, captions):
    """Caption sequences for each image AND a box per image: as many regions as images."""
    batch = processor(
        images=images,
        text=captions,
        boxes=[[[0, 0, 16, 16]] for _ in images],
        region_text=[["a small red star"] for _ in images],
    )
    return batch


def test_caption_rows_say_which_visual_tokens_each_caption_gets(tiny):
    """With as many regions as images, row counts cannot tell image captions from region captions: the flag does."""
    model, processor = tiny
    images = random_images(2)
    captions = ["a red circle", "a blue square"]
    image_batch = processor(images=images, text=captions)
    boxes = _region_batch(processor, images, captions)["boxes"]
    region_prompts = processor(images=images, boxes=[[[0, 0, 16, 16]] for _ in images])
    assert region_prompts["caption_rows"] == "regions"
    caption_inputs = {k: image_batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        plain = model(**caption_inputs).logits
        as_images = model(**caption_inputs, boxes=boxes, caption_rows="images").logits
        as_regions = model(**caption_inputs, boxes=boxes, caption_rows="regions").logits
        region_tokens = model.get_visual_tokens(image_batch["pixel_values"], boxes=boxes)
        expected_regions = model(
            input_ids=image_batch["input_ids"],
            attention_mask=image_batch["attention_mask"],
            visual_tokens=region_tokens,
        ).logits
    torch.testing.assert_close(as_images, plain)
    torch.testing.assert_close(as_regions, expected_regions)
    assert not torch.allclose(as_regions, plain)
    with pytest.raises(ValueError, match="`caption_rows` must say"):
        model(**caption_inputs, boxes=boxes)


def test_processor_training_batch_with_regions_names_its_layout(tiny):
    model, processor = tiny
    batch = _region_batch(processor, random_images(2), ["a red circle", "a blue square"])
    assert batch["caption_rows"] == "images_and_regions"
    assert batch["input_ids"].shape[0] == 4
    with torch.no_grad():
        output = model(**batch)
    assert torch.isfinite(output.loss)
    with pytest.raises(ValueError, match=r"`caption_rows='regions'` with 2 images and 2 regions needs 2"):
        model(**{**batch, "caption_rows": "regions"})


# ------------------------------------------------------------------------------------------ model card
def test_the_model_cards_lora_recipe_is_mmgem_lora_config(tiny):
    """The card shows the recipe the library applies (`mmgem_lora_config`), not a hand-written copy."""
    import ast

    from mmgem.conversion.publish import CardInfo, build_model_card
    from mmgem.integrations.lora import mmgem_lora_config

    model, _ = tiny
    card = str(build_model_card(model, CardInfo(), "tiny"))
    start = card.index("config = LoraConfig(") + len("config = ")
    call = card[start : card.index("\n)\n", start) + 2]
    shown = {k.arg: ast.literal_eval(k.value) for k in ast.parse(call).body[0].value.keywords}
    expected = mmgem_lora_config(model)
    assert shown == {
        "r": expected.r,
        "lora_alpha": expected.lora_alpha,
        "lora_dropout": expected.lora_dropout,
        "target_modules": expected.target_modules,
        "modules_to_save": list(expected.modules_to_save),
        "trainable_token_indices": dict(expected.trainable_token_indices),
    }


# ------------------------------------------------------------------------------------------ atomic writes
def test_atomic_writes_leave_the_usual_permissions_and_nothing_half_written(tmp_path):
    import os

    from mmgem.evaluation.evaluate import write_metrics
    from mmgem.files import atomic_path, write_json_atomic

    previous = os.umask(0o022)
    try:
        metrics = write_metrics({"a": 1.0}, tmp_path / "metrics.json")
        plain = write_json_atomic(tmp_path / "plain.json", [1])
    finally:
        os.umask(previous)
    assert (metrics.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o644
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "broken.json") as temporary:
        temporary.write_text("{")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "plain.json"]
