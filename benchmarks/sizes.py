"""Model sizes of the benchmark suite and the random-weight models built from them (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmgem.build import DEFAULT_CORPUS, build_mmgem, train_tokenizer
from mmgem.presets import architecture
from modeling_mmgem.configuration_mmgem import MMGEMConfig
from modeling_mmgem.modeling_mmgem import MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor


@dataclass(frozen=True)
class SizeSpec:
    """One model size (an architecture of the preset registry `mmgem.presets`) and the workload shapes measured.

    The vocabulary of the language model (`text["vocab_size"]`) may exceed the benchmark tokenizer's: the extra
    rows only make the embedding table and `lm_head` as large as in the real model, which matters for decode speed.
    """

    name: str
    architecture: dict[str, Any]
    image_batch: int  # image embedding, ST image encode
    text_batch: int  # text embedding, ST text encode
    text_length: int  # tokens per text, [EMB] included
    caption_batch: int  # captioning and the training step
    caption_length: int  # caption tokens in the training step
    decode_tokens: int  # new tokens for the per-token decode time
    curve_batches: tuple[int, ...] = field(default=(1, 2, 4, 8, 16))

    @property
    def vision(self) -> dict[str, Any]:
        return self.architecture["vision_config"]

    @property
    def text(self) -> dict[str, Any]:
        return self.architecture["text_config"]

    @property
    def pool_grid_size(self) -> int:
        return self.architecture["pool_grid_size"]

    @property
    def projection_dim(self) -> int:
        return self.architecture["projection_dim"]

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


SIZES: dict[str, SizeSpec] = {
    # The unit-test size: seconds for the whole suite.
    "tiny": SizeSpec(
        name="tiny",
        architecture=architecture("tiny", text_config={"vocab_size": 512}),
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
        architecture=architecture("small"),
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
        architecture=architecture("paper"),
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
    # Room for the special tokens in the table: no resize (the table is as large as the real model's).
    vocab_size = max(spec.text["vocab_size"], num_regular + 4)
    model, processor = build_mmgem(
        spec.vision,
        spec.text,
        tokenizer,
        vocab_size=vocab_size,
        device=device,
        pool_grid_size=spec.pool_grid_size,
        projection_dim=spec.projection_dim,
    )
    model.to(dtype=dtype).eval()
    return BenchModel(model, processor, spec, device, dtype, range(4, num_regular))
