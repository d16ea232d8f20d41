"""transformers' `ProcessorTesterMixin` (from the installed release's sdist) run against `MMGEMProcessor`.

The processor is built from a tiny CLIP image processor and a BPE tokenizer trained here (nothing is downloaded).
Every test the mixin defines runs, except those in the skips below, each with its reason.
"""

from __future__ import annotations

import unittest

import pytest

from mmgem.build import tiny_mmgem
from modeling_mmgem.processing_mmgem import MMGEMProcessor
from tests.conformance.sdist import common

processing_common = common("test_processing_common")

pytestmark = [pytest.mark.fast, pytest.mark.timeout(600)]


def _components():
    _, processor = tiny_mmgem()
    return processor


class MMGEMProcessorConformanceTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = MMGEMProcessor

    @classmethod
    def _setup_image_processor(cls):
        return _components().image_processor

    @classmethod
    def _setup_tokenizer(cls):
        return _components().tokenizer

    @staticmethod
    def prepare_processor_dict():
        return {"num_image_tokens": 4, "context_length": 256}

    # ---------------------------------------------------------------- skips, each for a feature MM-GEM lacks
    CHAT_REASON = (
        "MM-GEM captions an image without an instruction: its chat template refuses text in a user or system message "
        "(rather than ignoring it), and this test's conversations are instructions."
    )

    @unittest.skip(CHAT_REASON)
    def test_apply_chat_template_image_0(self):
        pass

    @unittest.skip(CHAT_REASON)
    def test_apply_chat_template_image_1(self):
        pass

    @unittest.skip(CHAT_REASON)
    def test_apply_chat_template_assistant_mask(self):
        pass

    @unittest.skip(
        "MM-GEM's images-with-text call is a training batch that pairs each caption with exactly one image; a sample "
        "without an image has no place in it (texts alone are embedded by `processor(text=...)`)."
    )
    def test_processor_text_has_no_visual(self):
        pass

    @unittest.skip(
        "A text alone becomes the embedding layout `<bos> text [EMB]`, not the bare tokenizer output: the processor "
        "adds the model's own tokens, so its ids differ from the tokenizer's by design (images are compared and pass)."
    )
    def test_subprocessor_defaults_0_text(self):
        pass
