"""vLLM's multimodal processing for MM-GEM: images (and an optional region box) to model inputs, and the prompt
placeholders the visual features take.

The pooling engine gives an image request ONE placeholder whose features are the image embedding (h1); the generate
engine gives a caption prompt `<bos>` then K placeholders (h2 visual tokens), as `MMGEMProcessor.caption_prompt`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
    TimingContext,
)

from modeling_mmgem.configuration_mmgem import MMGEMConfig
from modeling_mmgem.processing_mmgem import IMAGE_TOKEN, MMGEMProcessor

# The request option naming a region: `mm_processor_kwargs={"box": [x0, y0, x1, y1]}` in original image pixels.
BOX_KWARG = "box"
# Stands for "no box" in the per-image `region_boxes` field (real boxes are normalised to [0, 1]).
NO_BOX = -1.0


class MMGEMProcessingInfo(BaseProcessingInfo):
    """What vLLM needs to know about MM-GEM's inputs: one image per request, the placeholder count per engine."""

    def get_hf_config(self) -> MMGEMConfig:
        return self.ctx.get_hf_config(MMGEMConfig)

    @cached_property
    def mmgem_processor(self) -> MMGEMProcessor:
        # The installed MMGEMProcessor (the folder's copy is the same code): no `--trust-remote-code` needed.
        model_config = self.ctx.model_config
        return MMGEMProcessor.from_pretrained(model_config.model, revision=model_config.revision)

    def get_hf_processor(self, **kwargs: object) -> MMGEMProcessor:
        return self.mmgem_processor

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": {BOX_KWARG}}

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # One image per request: a pooling request returns one vector, a caption prompt describes one image.
        return {"image": 1}

    @property
    def is_pooling(self) -> bool:
        return self.ctx.model_config.runner_type == "pooling"

    def get_num_image_tokens(self) -> int:
        """Placeholders per image: 1 (the embedding) in the pooling engine, K visual tokens when generating."""
        return 1 if self.is_pooling else self.get_hf_config().num_image_tokens

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}

    def get_image_size(self) -> int:
        return self.get_hf_config().vision_config.image_size


class MMGEMDummyInputsBuilder(BaseDummyInputsBuilder[MMGEMProcessingInfo]):
    """Inputs vLLM profiles memory with: one placeholder and a square image of the tower's size."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None) -> dict:
        size = self.info.get_image_size()
        overrides = mm_options.get("image") if mm_options else None
        images = self._get_dummy_images(
            width=size, height=size, num_images=mm_counts.get("image", 0), overrides=overrides
        )
        return {"image": images}


class MMGEMMultiModalProcessor(BaseMultiModalProcessor[MMGEMProcessingInfo]):
    """Images through the folder's image processor (MMGEMProcessor), boxes to the model frame, placeholders."""

    def _special_ids(self) -> set[int]:
        config = self.info.get_hf_config()
        ids = set(self.info.get_tokenizer().all_special_ids)
        return ids | {config.emb_token_id, config.cap_token_id, config.image_token_id}

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> Any:
        if inputs.mm_data_items:
            image_id = self.info.get_hf_config().image_token_id
            if self.info.is_pooling:
                # An image embedding does not read text: only MM-GEM's control tokens (e.g. the chat template's
                # `<image>[CAP]`) may come with the image, and the request becomes the one placeholder.
                if not set(inputs.prompt) <= self._special_ids():
                    raise ValueError(
                        "MM-GEM embeds either a text or an image per request: an image request's prompt must be "
                        f"{IMAGE_TOKEN!r} (or empty), without text."
                    )
                inputs.prompt = [image_id]
            else:
                # The replacement brings the `<bos>` of the caption layout; one written before `<image>` is dropped.
                bos = self.info.get_tokenizer().bos_token_id
                if bos is not None and inputs.prompt[:2] == [bos, image_id]:
                    inputs.prompt = inputs.prompt[1:]
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = hf_data.get("images")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        box = hf_kwargs.get(BOX_KWARG)
        if box is None:
            box = (hf_kwargs.get("images_kwargs") or {}).get(BOX_KWARG)
        processor = self.info.get_hf_processor()
        if box is None:
            pixel_values = processor(images=images)["pixel_values"]
            region_boxes = torch.full((len(images), 4), NO_BOX)
        else:
            # MMGEMProcessor checks the box against the image and maps it through the resize and crop.
            outputs = processor(images=images, boxes=[[list(box)] for _ in images])
            pixel_values = outputs["pixel_values"]
            region_boxes = torch.cat([b.reshape(1, 4) for b in outputs["boxes"]]).float()
        return BatchFeature({"pixel_values": pixel_values, "region_boxes": region_boxes})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "region_boxes": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_id = self.info.get_hf_config().image_token_id
        if self.info.is_pooling:
            replacement: Any = [image_id]
        else:
            bos = self.info.get_tokenizer().bos_token_id
            tokens = ([bos] if bos is not None else []) + [image_id] * self.info.get_num_image_tokens()
            replacement = PromptUpdateDetails.select_token_id(tokens, image_id)
        return [PromptReplacement(modality="image", target=[image_id], replacement=replacement)]
