"""Model sizes of the benchmark suite and the random-weight models built from them (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig

from mmgem.build import DEFAULT_CORPUS, image_processor_for, train_tokenizer
from modeling_mmgem.configuration_mmgem import MMGEMConfig
from modeling_mmgem.modeling_mmgem import MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor, add_mmgem_special_tokens


@dataclass(frozen=True)
class SizeSpec:
    """One model size and the workload shapes measured on it.

    The vocabulary of the language model (`vocab_size`) may exceed the benchmark tokenizer's: the extra rows only
    make the embedding table and `lm_head` as large as in the real model, which matters for decode speed.
    """

    name: str
    vision: dict[str, Any]
    text: dict[str, Any]
    pool_grid_size: int
    projection_dim: int
    image_batch: int  # image embedding, ST image encode
    text_batch: int  # text embedding, ST text encode
    text_length: int  # tokens per text, [EMB] included
    caption_batch: int  # captioning and the training step
    caption_length: int  # caption tokens in the training step
    decode_tokens: int  # new tokens for the per-token decode time
    curve_batches: tuple[int, ...] = field(default=(1, 2, 4, 8, 16))

    @property
    def context(self) -> int:
        return self.text["max_position_embeddings"]

    @property
    def patch_grid(self) -> int:
        return self.vision["image_size"] // self.vision["patch_size"]

    def describe(self) -> str:
        v, t = self.vision, self.text
        return (
            f"ViT hidden {v['hidden_size']} x {v['num_hidden_layers']} layers, patch {v['patch_size']} at "
            f"{v['image_size']} px ({self.patch_grid}x{self.patch_grid} patches); Llama hidden {t['hidden_size']} x "
            f"{t['num_hidden_layers']} layers, vocab {t['vocab_size']}, context {t['max_position_embeddings']}; "
            f"pool grid {self.pool_grid_size}x{self.pool_grid_size}"
        )


def _vit(hidden: int, layers: int, heads: int, patch: int, image: int, intermediate: int) -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        patch_size=patch,
        image_size=image,
    )


def _llama(
    hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, context: int
) -> dict[str, Any]:
    return dict(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=context,
        rms_norm_eps=1e-5,
    )


SIZES: dict[str, SizeSpec] = {
    # The unit-test size: seconds for the whole suite.
    "tiny": SizeSpec(
        name="tiny",
        vision=_vit(32, 2, 4, 8, 32, 64),
        text=_llama(32, 2, 4, 2, 64, 512, 256),
        pool_grid_size=2,
        projection_dim=32,
        image_batch=4,
        text_batch=4,
        text_length=24,
        caption_batch=2,
        caption_length=12,
        decode_tokens=8,
        curve_batches=(1, 2, 4, 8),
    ),
    # A few minutes for the whole suite on 2 CPU cores; same shape ratios as the paper model, much thinner.
    "small": SizeSpec(
        name="small",
        vision=_vit(256, 6, 4, 16, 128, 1024),
        text=_llama(512, 6, 8, 2, 1376, 8192, 1024),
        pool_grid_size=4,
        projection_dim=256,
        image_batch=8,
        text_batch=8,
        text_length=32,
        caption_batch=4,
        caption_length=24,
        decode_tokens=16,
        curve_batches=(1, 2, 4, 8, 16),
    ),
    # The paper's instance: CLIP ViT-L/14 at 224 px and TinyLlama-1.1B shapes, random weights.
    "paper": SizeSpec(
        name="paper",
        vision=_vit(1024, 24, 16, 14, 224, 4096),
        text=_llama(2048, 22, 32, 4, 5632, 32000, 2048),
        pool_grid_size=4,
        projection_dim=768,
        image_batch=32,
        text_batch=32,
        text_length=128,
        caption_batch=8,
        caption_length=32,
        decode_tokens=32,
        curve_batches=(1, 2, 4, 8, 16, 32, 64),
    ),
}


@dataclass
class BenchModel:
    """The MM-GEM under test, its processor and the ids the synthetic inputs are drawn from."""

    model: MMGEMModel
    processor: MMGEMProcessor
    spec: SizeSpec
    device: torch.device
    dtype: torch.dtype
    regular_token_ids: range  # ids of ordinary (non-special) tokens of the tokenizer

    @property
    def config(self) -> MMGEMConfig:
        return self.model.config


def build_bench_model(spec: SizeSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> BenchModel:
    """A randomly initialised MM-GEM of size `spec`, created directly on `device` in `dtype`, in eval mode."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(DEFAULT_CORPUS, vocab_size=300, model_max_length=spec.context)
    num_regular = len(tokenizer)
    ids = add_mmgem_special_tokens(tokenizer)
    text = dict(spec.text)
    text_config = AutoConfig.for_model(
        text.pop("model_type"),
        **{**text, "vocab_size": max(text["vocab_size"], len(tokenizer))},
        pad_token_id=ids["pad_token_id"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(spec.vision)
    vision_config = AutoConfig.for_model(vision.pop("model_type"), **vision)
    config = MMGEMConfig(
        vision_config=vision_config,
        text_config=text_config,
        pool_grid_size=spec.pool_grid_size,
        projection_dim=spec.projection_dim,
        emb_token_id=ids["emb_token_id"],
        cap_token_id=ids["cap_token_id"],
        image_token_id=ids["image_token_id"],
    )
    with torch.device(device):  # initialise in place: no CPU copy of a 1.4B-parameter model on a GPU run
        model = MMGEMModel(config)
    model.to(dtype=dtype).eval()
    add_mmgem_special_tokens(tokenizer, model)  # generation config ids; no resize (the table is large enough)
    processor = MMGEMProcessor(
        image_processor=image_processor_for(config.vision_config),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        max_length=spec.context,
    )
    return BenchModel(model, processor, spec, device, dtype, range(4, num_regular))
