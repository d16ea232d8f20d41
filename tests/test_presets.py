"""The preset registry (mmgem.presets), as timm tests its model registry: every preset is built (on the meta
device: no memory, no time) and its shapes and parameter counts are checked against the stock transformers
modules of the same configs and, for the paper's instance, against the published sizes of its parts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from mmgem.presets import PRESETS, architecture
from modeling_mmgem.configuration_mmgem import MMGEMConfig
from modeling_mmgem.modeling_mmgem import MMGEMModel

pytestmark = [pytest.mark.fast, pytest.mark.timeout(300)]

# Published sizes: the vision tower of CLIP ViT-L/14 (224 px) and TinyLlama-1.1B (untied, vocabulary 32,000).
CLIP_VIT_L14_VISION_PARAMETERS = 303_179_776
TINYLLAMA_PARAMETERS = 1_100_048_384


def _configs(spec: dict) -> tuple:
    vision, text = dict(spec["vision_config"]), dict(spec["text_config"])
    vision_config = AutoConfig.for_model(vision.pop("model_type"), **vision)
    text_config = AutoConfig.for_model(text.pop("model_type"), **text)
    if "vocab_size" not in spec["text_config"]:
        text_config.vocab_size = spec["vocab_size"]
    return vision_config, text_config


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _projection_parameters(in_features: int, out_features: int, projection_type: str) -> int:
    linear = in_features * out_features + out_features
    return linear if projection_type == "linear" else linear + out_features * out_features + out_features


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_the_stock_towers_sizes(name):
    vision_config, text_config = _configs(architecture(name))
    spec = architecture(name)
    config = MMGEMConfig(
        vision_config=vision_config,
        text_config=text_config,
        pool_grid_size=spec["pool_grid_size"],
        projection_dim=spec["projection_dim"],
    )
    with torch.device("meta"):
        model = MMGEMModel(config)
        stock_vision = AutoModel.from_config(vision_config)
        stock_lm = AutoModelForCausalLM.from_config(text_config)
    assert _count(model.vision_model) == _count(stock_vision)
    assert _count(model.language_model) == _count(stock_lm)
    vision_hidden, text_hidden = vision_config.hidden_size, text_config.hidden_size
    heads = (
        _projection_parameters(vision_hidden, config.projection_dim, config.projection_type)  # h1
        + _projection_parameters(vision_hidden, text_hidden, config.projection_type)  # h2
        + _projection_parameters(text_hidden, config.projection_dim, config.projection_type)  # h3
        + 1  # the temperature
    )
    assert _count(model) == _count(stock_vision) + _count(stock_lm) + heads
    patch_grid = vision_config.image_size // vision_config.patch_size
    assert config.patch_grid_size == patch_grid
    assert config.num_image_tokens == spec["pool_grid_size"] ** 2
    assert model.language_model.get_input_embeddings().weight.shape == (text_config.vocab_size, text_hidden)
    assert model.image_projection.layers[-1].out_features == spec["projection_dim"]
    assert model.text_projection.layers[-1].out_features == spec["projection_dim"]
    assert model.visual_token_projection.layers[-1].out_features == text_hidden


def test_the_paper_preset_has_the_published_sizes_of_its_parts():
    vision_config, text_config = _configs(architecture("paper"))
    with torch.device("meta"):
        assert _count(AutoModel.from_config(vision_config)) == CLIP_VIT_L14_VISION_PARAMETERS
        assert _count(AutoModelForCausalLM.from_config(text_config)) == TINYLLAMA_PARAMETERS
    assert vision_config.image_size // vision_config.patch_size == 16  # ViT-L/14 at 224 px: a 16 x 16 patch grid


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="Unknown architecture preset 'huge'"):
        architecture("huge")


def test_overrides_update_a_copy():
    spec = architecture("tiny", text_config={"num_hidden_layers": 5}, projection_dim=16)
    assert spec["text_config"]["num_hidden_layers"] == 5 and spec["projection_dim"] == 16
    assert PRESETS["tiny"]["text_config"]["num_hidden_layers"] == 2 and PRESETS["tiny"]["projection_dim"] == 32
