"""The pixels a saved model sees do not depend on whether torchvision is installed.

transformers saves the PIL and torchvision image processors under one name and, on reload, picks torchvision
wherever it is installed. torchvision cannot be imported beside this CPU torch, so the tests report it available
(and hand out transformers' real torchvision class) to make transformers resolve it as on most users' machines.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor
from transformers.models.auto import image_processing_auto

from mmgem.build import tiny_mmgem
from modeling_mmgem import processing_mmgem
from modeling_mmgem.processing_mmgem import MMGEMProcessor, image_processor_with_backend

from .conftest import random_images

pytestmark = pytest.mark.fast
# The module itself (transformers' lazy `models.clip` would hand out a placeholder without torchvision).
image_processing_clip = importlib.import_module("transformers.models.clip.image_processing_clip")


@pytest.fixture
def torchvision_reported_available(monkeypatch):
    """transformers' image-processor resolution as where torchvision is installed."""
    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    resolve = image_processing_auto.get_image_processor_class_from_name

    def with_torchvision(name):
        if name == "CLIPImageProcessor":
            return image_processing_clip.CLIPImageProcessor
        return resolve(name)

    monkeypatch.setattr(image_processing_auto, "get_image_processor_class_from_name", with_torchvision)
    monkeypatch.setattr(processing_mmgem, "get_image_processor_class_from_name", with_torchvision)


def test_a_saved_processor_reloads_its_pil_image_processor_where_torchvision_is_available(
    tmp_path, torchvision_reported_available
):
    _, processor = tiny_mmgem()
    processor.save_pretrained(tmp_path)
    # What transformers alone does with the folder there: the torchvision implementation.
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is image_processing_clip.CLIPImageProcessor
    images = random_images(3)
    expected = processor(images=images)["pixel_values"]
    for loaded in (MMGEMProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert type(loaded.image_processor) is type(processor.image_processor)
        assert type(loaded.image_processor).__name__ == "CLIPImageProcessorPil"
        assert loaded.image_processing_backend == "pil"
        torch.testing.assert_close(loaded(images=images)["pixel_values"], expected, rtol=0, atol=0)


def test_backend_conversion_keeps_the_settings(torchvision_reported_available):
    _, processor = tiny_mmgem()
    pil = processor.image_processor
    torchvision = image_processor_with_backend(pil, "torchvision")
    assert type(torchvision) is image_processing_clip.CLIPImageProcessor
    back = image_processor_with_backend(torchvision, "pil")
    assert type(back) is type(pil) and back.to_dict() == pil.to_dict()
    assert image_processor_with_backend(pil, "pil") is pil
    # A processor built around a torchvision image processor uses the PIL one unless told otherwise.
    assert type(MMGEMProcessor(torchvision, processor.tokenizer, 4).image_processor) is type(pil)
    with pytest.raises(ValueError, match="image_processing_backend"):
        MMGEMProcessor(pil, processor.tokenizer, 4, image_processing_backend="opencv")
