"""Images already at the model's frame size skip the per-image work of the image processor, with the same pixels.

`pixels_of_images_in_frame` computes `pixel_values` for a whole batch at once where the stock resize and center crop
would leave every image unchanged; everywhere else the image processor runs. The tests hold it to the stock image
processor bit for bit, and check that each case it must not handle goes to the image processor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from mmgem.build import tiny_mmgem
from modeling_mmgem.processing_mmgem import MMGEMProcessor, pixels_of_images_in_frame

pytestmark = [pytest.mark.fast, pytest.mark.timeout(120)]

FRAME = 32


def every_byte_images(count: int, width: int = FRAME, height: int = FRAME, seed: int = 0) -> list[Image.Image]:
    """Random RGB images whose pixels take every value 0..255 in every channel."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels.reshape(-1, 3)[:256] = np.arange(256, dtype=np.uint8)[:, None]
        images.append(Image.fromarray(pixels))
    return images


IMAGE_PROCESSORS = {
    "clip": lambda: CLIPImageProcessorPil(size={"shortest_edge": FRAME}, crop_size=FRAME),
    "siglip": lambda: SiglipImageProcessorPil(size={"height": FRAME, "width": FRAME}),
    "clip_without_normalize": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": FRAME}, crop_size=FRAME, do_normalize=False
    ),
    "clip_odd_statistics": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": FRAME}, crop_size=FRAME, image_mean=0.3, image_std=0.7, rescale_factor=1 / 127.5
    ),
    "clip_raw_bytes": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": FRAME}, crop_size=FRAME, do_rescale=False, do_normalize=False
    ),
}


def stock_pixels(image_processor, images, **options) -> torch.Tensor:
    return image_processor(images=images, return_tensors="pt", **options)["pixel_values"]


@pytest.mark.parametrize("name", sorted(IMAGE_PROCESSORS))
def test_images_at_the_frame_size_give_the_stock_pixels_bit_for_bit(name):
    image_processor = IMAGE_PROCESSORS[name]()
    images = every_byte_images(5)
    fast = pixels_of_images_in_frame(image_processor, images)
    assert fast is not None, "the images are at the frame size: the batch path applies"
    expected = stock_pixels(image_processor, images)
    assert fast.dtype == expected.dtype and fast.shape == expected.shape == (5, 3, FRAME, FRAME)
    assert fast.is_contiguous()
    assert torch.equal(fast, expected)


def test_the_processor_gives_the_stock_pixels_with_and_without_the_batch_path():
    _, processor = tiny_mmgem()
    size = processor.image_processor.crop_size["height"]
    at_size = every_byte_images(4, size, size)
    assert pixels_of_images_in_frame(processor.image_processor, at_size) is not None
    other_sizes = every_byte_images(2, size + 8, size) + every_byte_images(2, size, size, seed=1)
    assert pixels_of_images_in_frame(processor.image_processor, other_sizes) is None
    for images in (at_size, other_sizes):
        expected = stock_pixels(processor.image_processor, images)
        assert torch.equal(processor(images=images)["pixel_values"], expected)
        boxes = [[[0, 0, 8, 8]] for _ in images]
        regions = [["a box"] for _ in images]
        batch = processor(images=images, text=["a caption"] * len(images), boxes=boxes, region_text=regions)
        assert torch.equal(batch["pixel_values"], expected)
    # Arrays and other modes are loaded to RGB first, then take the batch path; the pixels are the stock ones.
    arrays = [np.asarray(image) for image in at_size]
    assert torch.equal(processor(images=arrays)["pixel_values"], stock_pixels(processor.image_processor, at_size))
    grey = [image.convert("L") for image in at_size]
    rgb_of_grey = [image.convert("RGB") for image in grey]
    assert torch.equal(processor(images=grey)["pixel_values"], stock_pixels(processor.image_processor, rgb_of_grey))


def test_per_call_image_options_go_to_the_image_processor():
    _, processor = tiny_mmgem()
    size = processor.image_processor.crop_size["height"]
    images = every_byte_images(3, size, size)
    got = processor(images=images, do_normalize=False)["pixel_values"]
    assert torch.equal(got, stock_pixels(processor.image_processor, images, do_normalize=False))
    assert not torch.equal(got, processor(images=images)["pixel_values"])


class NormalizeTwice(CLIPImageProcessorPil):
    """An image processor that changes a step of the pipeline: the batch path must not stand in for it."""

    def normalize(self, image, mean, std, **kwargs):
        return super().normalize(super().normalize(image, mean, std, **kwargs), mean, std, **kwargs)


@pytest.mark.parametrize(
    "case",
    ["other_size", "mixed_sizes", "overridden_step", "padding", "not_rgb", "no_images"],
)
def test_cases_the_batch_path_does_not_reproduce_go_to_the_image_processor(case):
    image_processor = IMAGE_PROCESSORS["clip"]()
    images = every_byte_images(2)
    if case == "other_size":
        images = every_byte_images(2, FRAME + 1, FRAME)
    elif case == "mixed_sizes":
        images = images + every_byte_images(1, FRAME * 2, FRAME * 2)
    elif case == "overridden_step":
        image_processor = NormalizeTwice(size={"shortest_edge": FRAME}, crop_size=FRAME)
    elif case == "padding":
        image_processor.do_pad = True
    elif case == "not_rgb":
        images = [image.convert("RGBA") for image in images]
    elif case == "no_images":
        images = []
    assert pixels_of_images_in_frame(image_processor, images) is None


def test_an_image_processor_that_overrides_a_step_keeps_its_own_pixels():
    _, processor = tiny_mmgem()
    settings = processor.image_processor.to_dict()
    settings = {k: v for k, v in settings.items() if k != "image_processor_type"}
    custom = NormalizeTwice(**settings)
    processor = MMGEMProcessor(custom, processor.tokenizer, processor.num_image_tokens)
    size = custom.crop_size["height"]
    images = every_byte_images(2, size, size)
    assert torch.equal(processor(images=images)["pixel_values"], stock_pixels(custom, images))
    assert not torch.equal(
        processor(images=images)["pixel_values"], stock_pixels(CLIPImageProcessorPil(**settings), images)
    )
