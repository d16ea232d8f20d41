"""mmgem.embedding: the one batching/normalising layer over get_text_features, get_image_features and generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmgem.embedding import caption, encode_images, encode_regions, encode_texts, pad_to_square

from .conftest import random_images

pytestmark = [pytest.mark.fast, pytest.mark.timeout(300)]

TEXTS = ["a red circle", "two small blue squares and a large green star", "x", "a cat, a dog; café ☕"]


def test_text_vectors_equal_the_model_s_features_normalised_in_any_batching(tiny):
    model, processor = tiny
    with torch.no_grad():
        expected = model.get_text_features(**processor(text=TEXTS, truncation=True)).pooler_output  # [4, D]
    raw = encode_texts(model, processor, TEXTS, batch_size=4, normalize=False)
    torch.testing.assert_close(raw, expected.float(), atol=1e-5, rtol=1e-5)
    for batch_size in (1, 3, 64):
        got = encode_texts(model, processor, TEXTS, batch_size=batch_size)
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == expected.shape
        torch.testing.assert_close(got, F.normalize(expected.float(), dim=-1), atol=1e-5, rtol=1e-5)


def test_image_vectors_from_pil_images_and_paths_agree(tiny, tmp_path):
    model, processor = tiny
    images = random_images(3)
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    with torch.no_grad():
        expected = model.get_image_features(processor(images=images)["pixel_values"]).pooler_output.float()
    torch.testing.assert_close(encode_images(model, processor, images, batch_size=2), F.normalize(expected, dim=-1))
    torch.testing.assert_close(encode_images(model, processor, paths, batch_size=1, normalize=False), expected)


def test_region_vectors_follow_image_then_box_order_and_skip_images_without_boxes(tiny):
    model, processor = tiny
    images = random_images(3)
    boxes = [[[0, 0, 20, 20], [5, 5, 30, 25]], [], [[2, 3, 12, 14]]]
    with torch.no_grad():
        inputs = processor(images=[images[0], images[2]], boxes=[boxes[0], boxes[2]])
        expected = model.get_image_features(inputs["pixel_values"], boxes=inputs["boxes"]).pooler_output.float()
    got = encode_regions(model, processor, images, boxes, batch_size=1)
    assert got.shape == (3, expected.shape[1])
    torch.testing.assert_close(got, F.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)


def test_pad_square_embeds_the_padded_image_with_shifted_boxes(tiny):
    model, processor = tiny
    image = random_images(1, sizes=((60, 30),))[0]
    box = [[10, 5, 40, 25]]
    padded, shifted = pad_to_square(image, box)
    assert padded.size == (60, 60) and shifted == [[10, 20, 40, 40]]
    direct = encode_regions(model, processor, [padded], [shifted])
    torch.testing.assert_close(encode_regions(model, processor, [image], [box], pad_square=True), direct)


def test_captions_equal_generate_and_pass_decoding_options(tiny):
    model, processor = tiny
    images = random_images(2)
    with torch.no_grad():
        greedy = model.generate(**processor(images=images), max_new_tokens=5, do_sample=False)
        beams = model.generate(**processor(images=images), max_new_tokens=5, num_beams=3, do_sample=False)
    assert caption(model, processor, images, batch_size=1, max_new_tokens=5) == processor.decode_captions(greedy)
    assert caption(model, processor, images, max_new_tokens=5, num_beams=3) == processor.decode_captions(beams)
    boxes = [[[0, 0, 20, 20]], [[4, 4, 30, 30], [0, 0, 10, 10]]]
    assert len(caption(model, processor, images, boxes=boxes, max_new_tokens=3)) == 3


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, p: encode_texts(m, p, "one string"), "list of strings"),
        (lambda m, p: encode_texts(m, p, ["a"], batch_size=0), "`batch_size`"),
        (lambda m, p: encode_regions(m, p, random_images(2), [[[0, 0, 4, 4]]]), "one list of boxes per image"),
        (lambda m, p: caption(m, p, random_images(1), boxes=[]), "one list of boxes per image"),
    ],
)
def test_bad_arguments_are_named(tiny, call, message):
    model, processor = tiny
    with pytest.raises((ValueError, TypeError), match=message):
        call(model, processor)


def test_empty_inputs_give_empty_results(tiny):
    model, processor = tiny
    assert encode_texts(model, processor, []).numel() == 0
    assert caption(model, processor, []) == []
