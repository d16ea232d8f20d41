"""Configuration of MM-GEM, the Multi-Modal Generative Embedding Model.

This file is remote code: it travels to the Hub next to the weights, so it imports only torch and transformers
and reaches its siblings through single-dot relative imports.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

PROJECTION_TYPES = ("linear", "mlp")

# Vision towers whose `last_hidden_state` is taken *before* the final layer norm (the norm is only applied to the
# pooled CLS token). MM-GEM pools patch tokens, so for these towers the model applies `post_layernorm` itself.
VISION_TOWERS_WITH_PRE_NORM_OUTPUT = ("clip_vision_model",)


def _as_config(value: Any, default_model_type: str, argument: str) -> PretrainedConfig:
    """Turn `None`, a dict (with or without `model_type`) or a config into a transformers config."""
    if value is None:
        return CONFIG_MAPPING[default_model_type]()
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default_model_type)
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"`{argument}` has unknown model_type {model_type!r}.")
        return AutoConfig.for_model(model_type, **value)
    raise ValueError(f"`{argument}` must be None, a dict or a PretrainedConfig, got {type(value).__name__}.")


# task -> pipeline class of pipeline_mmgem.py, which travels with the model: `config.custom_pipelines`.
PIPELINE_CLASSES = {
    "zero-shot-image-classification": "MMGEMZeroShotImageClassificationPipeline",
    "image-text-to-text": "MMGEMImageTextToTextPipeline",
    "image-to-text": "MMGEMImageTextToTextPipeline",  # an alias of image-text-to-text in transformers 5.24
    "image-feature-extraction": "MMGEMImageFeatureExtractionPipeline",
    "feature-extraction": "MMGEMTextFeatureExtractionPipeline",
}
# `register_for_auto_class` records one auto class per class; the model also serves AutoModelForImageTextToText.
EXTRA_AUTO_MAP = {"AutoModelForImageTextToText": "modeling_mmgem.MMGEMModel"}


def custom_pipelines_config() -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of config.json: each task served by its class in pipeline_mmgem.py, on
    `AutoModel`."""
    return {
        task: {"impl": f"pipeline_mmgem.{name}", "pt": ["AutoModel"], "type": "multimodal"}
        for task, name in PIPELINE_CLASSES.items()
    }


class MMGEMConfig(PretrainedConfig):
    r"""
    Configuration of an [`MMGEMModel`]: a vision tower and one causal language model that does both text embedding
    and captioning, linked by three light projections (paper: h1, h2, h3) and a PoolAggregator.

    Choices marked *our default* are not given by the paper (arXiv 2405.19333) and are documented in the README.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the vision tower; any transformers vision model with a square patch grid. Defaults to a
            `clip_vision_model` config. `siglip_vision_model` is supported too (its attention-pooling head is not
            used: set `vision_use_head=False`).
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the causal language model. Defaults to a `llama` config.
        pool_grid_size (`int`, *optional*, defaults to 4):
            Side `k` of the PoolAggregator grid: each image (or region) becomes `k * k` visual tokens for captioning.
            Must not exceed the vision tower's patch grid. *Our default.*
        projection_dim (`int`, *optional*, defaults to 768):
            Size of the shared image-text embedding space.
        projection_type (`str`, *optional*, defaults to `"mlp"`):
            `"linear"` or `"mlp"` (Linear-GELU-Linear) for h1, h2 and h3. *Our default.*
        emb_token_id (`int`, *optional*):
            Id of the `[EMB]` token whose last hidden state is the text embedding.
        cap_token_id (`int`, *optional*):
            Id of the `[CAP]` token that separates the visual tokens from the caption.
        image_token_id (`int`, *optional*):
            Id of the `<image>` placeholder replaced by visual tokens inside the model.
        logit_scale_init_value (`float`, *optional*, defaults to `ln(1 / 0.07)`):
            Initial value of the learnable log temperature of the contrastive loss (as CLIP).
        logit_scale_max (`float`, *optional*, defaults to `ln(100)`):
            Upper clamp of the log temperature (as CLIP).
        contrastive_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the symmetric InfoNCE loss in the joint loss.
        caption_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the caption cross-entropy in the joint loss.
        mask_false_negatives (`bool`, *optional*, defaults to `True`):
            Rows of the contrastive loss that describe the same thing (identical texts, the same image repeated) are
            left out of each other's softmax denominators instead of being pushed apart as negatives. *Our default.*
        region_sampling_ratio (`int`, *optional*):
            Bilinear samples per grid cell and axis in RoIAlign. `None` picks `ceil(grid / k)`, which makes the
            whole-image box reproduce the image features exactly when the patch grid is divisible by `k`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the projections.
    """

    model_type = "mmgem"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | PretrainedConfig | None = None,
        text_config: dict | PretrainedConfig | None = None,
        pool_grid_size: int = 4,
        projection_dim: int = 768,
        projection_type: str = "mlp",
        emb_token_id: int | None = None,
        cap_token_id: int | None = None,
        image_token_id: int | None = None,
        logit_scale_init_value: float = math.log(1 / 0.07),
        logit_scale_max: float = math.log(100.0),
        contrastive_loss_weight: float = 1.0,
        caption_loss_weight: float = 1.0,
        mask_false_negatives: bool = True,
        region_sampling_ratio: int | None = None,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.vision_config = _as_config(vision_config, "clip_vision_model", "vision_config")
        self.text_config = _as_config(text_config, "llama", "text_config")
        self.pool_grid_size = pool_grid_size
        self.projection_dim = projection_dim
        self.projection_type = projection_type
        self.emb_token_id = emb_token_id
        self.cap_token_id = cap_token_id
        self.image_token_id = image_token_id
        self.logit_scale_init_value = logit_scale_init_value
        self.logit_scale_max = logit_scale_max
        self.contrastive_loss_weight = contrastive_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.mask_false_negatives = mask_false_negatives
        self.region_sampling_ratio = region_sampling_ratio
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        # What a saved folder serves: the Auto classes and transformers' pipelines of its remote code.
        kwargs["auto_map"] = {**EXTRA_AUTO_MAP, **(kwargs.get("auto_map") or {})}
        kwargs["custom_pipelines"] = {**custom_pipelines_config(), **(kwargs.get("custom_pipelines") or {})}
        super().__init__(**kwargs)
        self._check()

    # ------------------------------------------------------------------ derived values
    @property
    def patch_grid_size(self) -> int:
        """Side of the vision tower's square patch grid (e.g. 16 for ViT-L/14 at 224 px)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Number `K = k * k` of visual tokens per image or region in the caption sequence."""
        return self.pool_grid_size**2

    @property
    def vision_output_needs_norm(self) -> bool:
        """Whether the tower's final layer norm must be applied to its patch tokens by MM-GEM."""
        return self.vision_config.model_type in VISION_TOWERS_WITH_PRE_NORM_OUTPUT

    # ------------------------------------------------------------------ validation
    def _check(self) -> None:
        for name in ("image_size", "patch_size", "hidden_size"):
            if not isinstance(getattr(self.vision_config, name, None), int):
                raise ValueError(
                    f"`vision_config` must describe a ViT-like tower with an integer `{name}`; "
                    f"got model_type {self.vision_config.model_type!r}."
                )
        if self.vision_config.image_size % self.vision_config.patch_size:
            raise ValueError(
                f"`vision_config.image_size` ({self.vision_config.image_size}) must be divisible by `patch_size` "
                f"({self.vision_config.patch_size}) to give a square patch grid."
            )
        if not isinstance(self.pool_grid_size, int) or not 1 <= self.pool_grid_size <= self.patch_grid_size:
            raise ValueError(
                f"`pool_grid_size` must be an int in [1, {self.patch_grid_size}] (the patch grid side), "
                f"got {self.pool_grid_size!r}."
            )
        if self.projection_type not in PROJECTION_TYPES:
            raise ValueError(f"`projection_type` must be one of {PROJECTION_TYPES}, got {self.projection_type!r}.")
        if not isinstance(self.projection_dim, int) or self.projection_dim < 1:
            raise ValueError(f"`projection_dim` must be a positive int, got {self.projection_dim!r}.")
        if not isinstance(self.mask_false_negatives, bool):
            raise ValueError(f"`mask_false_negatives` must be True or False, got {self.mask_false_negatives!r}.")
        if self.region_sampling_ratio is not None and (
            not isinstance(self.region_sampling_ratio, int) or self.region_sampling_ratio < 1
        ):
            raise ValueError(
                f"`region_sampling_ratio` must be None or a positive int, got {self.region_sampling_ratio!r}."
            )
        self.check_token_ids()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict[str, Any], dict]:
        """As `PretrainedConfig.get_config_dict`, but a folder or repo that is not an MM-GEM model is refused.

        transformers returns an empty dict for a folder without `config.json` (e.g. one whose final save was
        interrupted), which would build the default towers: a 7B-sized Llama and a CLIP ViT-L. Refusing here stops
        `MMGEMConfig.from_pretrained` and `MMGEMModel.from_pretrained` before anything is built.
        """
        try:
            config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        except ValueError as error:  # a config.json that is not JSON
            raise ValueError(f"{pretrained_model_name_or_path}: config.json is not valid JSON ({error}).") from error
        if not config_dict:
            raise ValueError(
                f"{pretrained_model_name_or_path} is not an MM-GEM model: it has no config.json (an interrupted save "
                "leaves such a folder; save or export the model again)."
            )
        model_type = config_dict.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is not an MM-GEM model: its config.json has model_type "
                f"{model_type!r}, expected {cls.model_type!r}."
            )
        return config_dict, kwargs

    def check_token_ids(self) -> None:
        """Raise a ValueError if a special-token id is set but lies outside the language model's vocabulary."""
        vocab_size = self.text_config.vocab_size
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self.text_config, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(isinstance(v, int) and 0 <= v < vocab_size for v in values):
                raise ValueError(
                    f"`text_config.{name}` must be None or an int in [0, {vocab_size}) (the text_config vocabulary), "
                    f"got {value!r}."
                )
        for name in ("emb_token_id", "cap_token_id", "image_token_id"):
            token_id = getattr(self, name)
            if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < vocab_size):
                raise ValueError(
                    f"`{name}` must be an int in [0, {vocab_size}) (the text_config vocabulary), got {token_id!r}. "
                    "Add the special tokens with `add_mmgem_special_tokens` before setting their ids."
                )
        ids = [getattr(self, n) for n in ("emb_token_id", "cap_token_id", "image_token_id")]
        set_ids = [i for i in ids if i is not None]
        if len(set(set_ids)) != len(set_ids):
            raise ValueError(f"`emb_token_id`, `cap_token_id` and `image_token_id` must differ, got {ids}.")

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("vision_config", "text_config"):
            value = getattr(self, key)
            output[key] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return output


# `save_pretrained` writes `auto_map` and copies this file next to the weights.
MMGEMConfig.register_for_auto_class()
if __name__ == "modeling_mmgem.configuration_mmgem":
    # Imported from the installed mmgem package (not as a Hub copy): the Auto classes know the type without
    # `trust_remote_code`, so e.g. `MMGEMProcessor.from_pretrained(folder)` does not prompt for it.
    AutoConfig.register("mmgem", MMGEMConfig, exist_ok=True)

__all__ = ["MMGEMConfig", "PIPELINE_CLASSES", "custom_pipelines_config"]
