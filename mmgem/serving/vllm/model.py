"""MM-GEM as a vLLM model: vLLM's own CLIP/SigLIP vision transformer and causal LM (Llama, Qwen2, ...), MM-GEM's
PoolAggregator and h1/h2/h3 projections (the same modules as the transformers model), weights read from an exported
folder unchanged.

The class serves the runner the engine was started with:

- pooling: `forward` returns, per token, the h3 projection of the LM's hidden state; the LAST pooler picks it at the
  final token (`[EMB]`). An image request is one placeholder whose "token embedding" is the h1 image vector, passed
  through as it is (the LM's output there is discarded), so text and image requests share a batch.
- generate: the h2 visual tokens replace the `<image>` placeholders (as LLaVA), the LM's logits drive sampling, and
  MM-GEM's control tokens are never sampled (as `MMGEMModel.generate` suppresses them).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler import DispatchPooler
from vllm.model_executor.models.clip import CLIPVisionTransformer
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.interfaces_base import default_pooling_type
from vllm.model_executor.models.siglip import SiglipVisionTransformer
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from modeling_mmgem.configuration_mmgem import MMGEMConfig
from modeling_mmgem.modeling_mmgem import MMGEMPoolAggregator, MMGEMProjection
from modeling_mmgem.processing_mmgem import IMAGE_TOKEN

from .processing import MMGEMDummyInputsBuilder, MMGEMMultiModalProcessor, MMGEMProcessingInfo

VISION_TOWERS = {"clip_vision_model": CLIPVisionTransformer, "siglip_vision_model": SiglipVisionTransformer}


def build_vision_tower(vision_config, quant_config, prefix: str) -> nn.Module:
    """vLLM's vision transformer for the folder's tower, with its final layer norm (MM-GEM pools normed patches)."""
    tower_class = VISION_TOWERS.get(vision_config.model_type)
    if tower_class is None:
        raise ValueError(
            f"MM-GEM's vLLM plugin serves the vision towers {sorted(VISION_TOWERS)}; this folder has "
            f"{vision_config.model_type!r}."
        )
    kwargs = {"use_head": False} if tower_class is SiglipVisionTransformer else {}
    return tower_class(vision_config, quant_config, require_post_norm=True, prefix=prefix, **kwargs)


def causal_lm_architecture(text_config) -> str:
    """vLLM's architecture name for the language model of the folder (e.g. `LlamaForCausalLM`)."""
    architectures = getattr(text_config, "architectures", None)
    if architectures:
        return architectures[0]
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_config.model_type)
    if name is None:
        raise ValueError(f"No causal language model is known for text_config.model_type {text_config.model_type!r}.")
    return name


@default_pooling_type(seq_pooling_type="LAST")
@MULTIMODAL_REGISTRY.register_processor(
    MMGEMMultiModalProcessor, info=MMGEMProcessingInfo, dummy_inputs=MMGEMDummyInputsBuilder
)
class MMGEMForVllm(nn.Module, SupportsMultiModal):
    """MM-GEM for vLLM's pooling runner (text and image embeddings) and generate runner (captions)."""

    # Both runners are served; vLLM's `--runner` (or `LLM(runner=...)`) picks one per engine.
    is_pooling_model = True

    # Folder names -> this module's names. transformers saves the vision transformer's weights under
    # `vision_model.` (older releases: `vision_model.vision_model.`); the language model keeps its names.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={"vision_model.vision_model.": "vision_tower.", "vision_model.": "vision_tower."}
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError("MM-GEM takes images only.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: MMGEMConfig = vllm_config.model_config.hf_config
        self.config = config
        self.pooling = vllm_config.model_config.runner_type == "pooling"
        quant_config = vllm_config.quant_config
        vision_hidden = config.vision_config.hidden_size
        text_hidden = config.text_config.hidden_size
        if self.pooling and config.projection_dim > text_hidden:
            # The image vector travels in the LM's token-embedding row of its placeholder.
            raise ValueError(
                f"The pooling engine needs projection_dim ({config.projection_dim}) <= the language model's "
                f"hidden size ({text_hidden})."
            )

        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = build_vision_tower(
                config.vision_config, quant_config, prefix=maybe_prefix(prefix, "vision_tower")
            )
            if self.pooling:  # h1
                self.image_projection = MMGEMProjection(vision_hidden, config.projection_dim, config.projection_type)
            else:  # h2
                self.visual_token_projection = MMGEMProjection(vision_hidden, text_hidden, config.projection_type)
        self.pool_aggregator = MMGEMPoolAggregator(
            config.pool_grid_size, config.patch_grid_size, config.region_sampling_ratio
        )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=[causal_lm_architecture(config.text_config)],
            )
        if self.pooling:  # h3
            self.text_projection = MMGEMProjection(text_hidden, config.projection_dim, config.projection_type)
            self.pooler = DispatchPooler.for_embedding(vllm_config.model_config.pooler_config)
        special = [config.image_token_id, config.emb_token_id, config.cap_token_id]
        self.register_buffer(
            "suppressed_token_ids", torch.tensor([i for i in special if i is not None], dtype=torch.long), False
        )
        # Set by `embed_input_ids`, read by `forward` (pooling): which rows carry an image vector.
        self._image_rows: torch.Tensor | None = None

    # ------------------------------------------------------------------ vision
    def _feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> the normed patch grid as a feature map [B, C, g, g] (CLS / register tokens dropped)."""
        hidden = self.vision_tower(pixel_values.to(self.vision_tower.dtype))  # [B, P + g*g, C]
        patch_tokens = hidden[:, -(self.config.patch_grid_size**2) :]
        return self.pool_aggregator.to_feature_map(patch_tokens)

    def _pooled(self, feature_map: torch.Tensor, region_boxes: torch.Tensor, grid: bool) -> torch.Tensor:
        """Per image, the whole image or its region: k*k cell features [B, K, C] (`grid`) or vectors [B, C]."""
        pooled = self.pool_aggregator.pool_grid(feature_map) if grid else self.pool_aggregator.pool_global(feature_map)
        has_box = region_boxes[:, 0] >= 0  # the processor writes -1 for "no box"
        if bool(has_box.any()):
            index = torch.nonzero(has_box).squeeze(1)
            boxes = region_boxes[index].to(feature_map.dtype)
            cells, vectors = self.pool_aggregator.pool_regions(feature_map, boxes, index)
            pooled = pooled.clone()
            pooled[index] = cells if grid else vectors
        return pooled

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        region_boxes = kwargs.get("region_boxes")
        if isinstance(region_boxes, (list, tuple)):
            region_boxes = torch.stack(list(region_boxes))
        region_boxes = region_boxes.reshape(-1, 4).to(pixel_values.device)
        feature_map = self._feature_map(pixel_values)
        if self.pooling:
            vectors = self.image_projection(self._pooled(feature_map, region_boxes, grid=False))  # [B, D]
            width = self.config.text_config.hidden_size
            # One placeholder per image, whose embedding row (LM width) holds the vector, zero-padded.
            rows = torch.nn.functional.pad(vectors, (0, width - vectors.shape[-1]))
            return tuple(rows[:, None, :].unbind(0))
        tokens = self.visual_token_projection(self._pooled(feature_map, region_boxes, grid=True))  # [B, K, H]
        return tuple(tokens.unbind(0))

    # ------------------------------------------------------------------ language model
    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        has_images = multimodal_embeddings is not None and len(multimodal_embeddings) > 0
        self._image_rows = is_multimodal if has_images else None
        if not has_images or is_multimodal is None:
            return super().embed_input_ids(input_ids)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None and self.pooling:
            raise RuntimeError("MM-GEM's pooling engine does not support pipeline parallelism.")
        if not self.pooling:
            return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)
        image_rows = self._image_rows
        dim = self.config.projection_dim
        if inputs_embeds is not None and image_rows is not None and bool(image_rows.all()):
            return inputs_embeds[:, :dim]  # only image requests: the LM has nothing to do
        hidden = self.language_model.model(input_ids, positions, None, inputs_embeds=inputs_embeds)
        embeddings = self.text_projection(hidden)  # [T, D]
        if inputs_embeds is not None and image_rows is not None and bool(image_rows.any()):
            rows = image_rows.to(embeddings.device)[:, None]
            embeddings = torch.where(rows, inputs_embeds[:, :dim].to(embeddings.dtype), embeddings)
        return embeddings

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None and self.suppressed_token_ids.numel():
            # A caption never contains `<image>`, `[EMB]` or `[CAP]` (MMGEMModel.generate suppresses them too).
            logits = logits.index_fill(-1, self.suppressed_token_ids.to(logits.device), float("-inf"))
        return logits

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        unused = ["logit_scale."]  # the contrastive temperature only matters in training
        unused += ["visual_token_projection."] if self.pooling else ["image_projection.", "text_projection."]
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=unused)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
