"""transformers' `ModelTesterMixin` (from the installed release's sdist) run against `MMGEMModel`.

Every test the mixin defines runs, except those in `SKIPS`, each with the reason (a feature the model does not have,
or a check that does not apply to a composite embedding + captioning model); docs/conformance.md lists them too.
"""

from __future__ import annotations

import unittest
import unittest.mock

import pytest
import torch

from modeling_mmgem.modeling_mmgem import MMGEMModel
from tests.conformance.sdist import GenerationTesterMixin, common
from tests.conformance.tester import MMGEMModelTester

modeling_common = common("test_modeling_common")

pytestmark = [pytest.mark.fast, pytest.mark.timeout(600)]


class MMGEMModelConformanceTest(modeling_common.ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (MMGEMModel,)
    all_generative_model_classes = (MMGEMModel,)
    pipeline_model_mapping = {}
    test_resize_embeddings = True
    # The mixin runs its weight-initialisation check only for models it dates to 2023 or later (from a copyright
    # line MM-GEM's files do not carry): run it.
    test_can_init_all_missing_weights_before_2023 = True
    _is_composite = True
    additional_model_inputs = ["pixel_values"]

    def setUp(self) -> None:
        self.model_tester = MMGEMModelTester(self)
        self.config_tester = None

    # transformers' mixin adds `labels` only for the model classes in its own Auto mappings; MM-GEM is an
    # image-text-to-text model, so it gets what that mapping's models get.
    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=False)
        if return_labels:
            inputs_dict["labels"] = torch.zeros(
                (self.model_tester.batch_size, self.model_tester.seq_length), dtype=torch.long
            )
        return inputs_dict

    def _prepare_config_and_inputs_for_retain_grad_hidden_states_attentions(self):
        # The mixin back-propagates from `outputs[0]` into the caption pass's hidden states: give the caption forward
        # alone (with the contrastive texts, `outputs[0]` is the contrastive loss, which does not reach them).
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        return config, {k: v for k, v in inputs.items() if not k.startswith("text_")}

    def test_causal_lm_loss_honors_shift_labels(self):
        # The mixin picks the models to check from transformers' static image-text-to-text names; MM-GEM registers
        # itself with AutoModelForImageTextToText at run time, so it is named here for the duration of the check.
        names = modeling_common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        with unittest.mock.patch.dict(names, {"mmgem": "MMGEMModel"}):
            super().test_causal_lm_loss_honors_shift_labels()

    def test_reverse_loading_mapping(self):
        # MM-GEM's one conversion reshapes the temperature of older folders (shape () -> (1,)) and renames no key:
        # the mixin's documented switch for conversions that change values, not names.
        super().test_reverse_loading_mapping(check_keys_were_modified=False)

    CHECKPOINTING_SKIP = (
        "The mixin wraps the first checkpointed layer's forward in ONE mock whose target each call replaces; "
        "that layer is a language-model layer (the LM is the first child, which PEFT's prompt learning needs), "
        "and in a joint step it runs twice (texts, then captions), so the recompute of the first run calls the "
        "second's forward. tests/test_model_api.py checks the same on a joint step: the layers are recomputed, "
        "every trained parameter gets a gradient, and the gradients equal those without checkpointing."
    )

    @unittest.skip(CHECKPOINTING_SKIP)
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(CHECKPOINTING_SKIP)
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip(CHECKPOINTING_SKIP)
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    @unittest.skip(
        "MMGEMModel is one class for embedding and captioning, with no base model inside it: `base_model` is the "
        "model itself (renaming `base_model_prefix` to a child would change the weight names of saved folders)."
    )
    def test_model_base_model_prefix(self):
        pass
