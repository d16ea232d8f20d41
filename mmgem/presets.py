"""The MM-GEM architectures the project builds from scratch, in one registry.

Each preset is an architecture spec, the format `mmgem train --from-scratch` reads from a JSON file too:
`{"vision_config": {...}, "text_config": {...}, "pool_grid_size", "projection_dim", "vocab_size"}` where
`vocab_size` is the size of the byte-level BPE tokenizer trained on the data (the language model's embedding table
gets the tokenizer's size, or `text_config["vocab_size"]` where a preset sets a larger table).

- `tiny`: the tests' model (seconds): hidden 32, 2 layers per tower, 32 px images, 4x4 patch grid.
- `demo`: what `make demo` trains on 2 CPU cores: hidden 128, a 4-layer ViT on 64 px images (8x8 patch grid), a
  1-layer Qwen3 (a Llama with its queries and keys normalised per head).
- `experiments`: the demo's widths, image size and patch grid with 2 layers per tower and a 512-token context
  (long descriptions fit), for the ~40 models `make experiments` trains.
- `small`: the benchmarks' default size, the paper's shape ratios, much thinner (ViT 256 x 6, Llama 512 x 6).
- `paper`: the paper's instance, CLIP ViT-L/14 at 224 px and TinyLlama-1.1B shapes (random weights here).
"""

from __future__ import annotations

import copy
from typing import Any


def vit(hidden: int, layers: int, heads: int, patch: int, image: int, intermediate: int) -> dict[str, Any]:
    """A CLIP vision tower config (as keyword arguments)."""
    return dict(
        model_type="clip_vision_model",
        image_size=image,
        patch_size=patch,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )


def llama(
    hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, context: int, **extra: Any
) -> dict[str, Any]:
    """A Llama config (as keyword arguments)."""
    return dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        **extra,
    )


def qwen3(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, context: int) -> dict[str, Any]:
    """A Qwen3 config (as keyword arguments): Llama's layout with an RMSNorm on each head's queries and keys."""
    return {
        **llama(hidden, layers, heads, kv_heads, intermediate, context),
        "model_type": "qwen3",
        "head_dim": hidden // heads,
    }


def _spec(vision: dict, text: dict, pool_grid_size: int, projection_dim: int, vocab_size: int) -> dict[str, Any]:
    return dict(
        vision_config=vision,
        text_config=text,
        pool_grid_size=pool_grid_size,
        projection_dim=projection_dim,
        vocab_size=vocab_size,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _spec(vit(32, 2, 4, 8, 32, 64), llama(32, 2, 4, 2, 64, 256), 2, 32, 320),
    # The demo's language model has 1 layer: the steps this saves (1.5x as many in the same time as with 4 layers) are
    # worth more to its targets than the depth (`experiments/demo_ablation.py`: `demo`, `language_model_2_layers`,
    # `previous_demo`). Its queries and keys are normalised per head (Qwen3's layout): on the validation split, its
    # captions of several objects name them in the right order 0.66 of the time against 0.47 with Llama's layout, and
    # caption exact match is 0.55 against 0.455 (`experiments/demo_ablation.py`: `demo`, `llama_language_model`).
    "demo": _spec(vit(128, 4, 4, 8, 64, 256), qwen3(128, 1, 4, 4, 256, 128), 4, 128, 400),
    "experiments": _spec(vit(128, 2, 4, 8, 64, 256), llama(128, 2, 4, 4, 256, 512), 4, 128, 400),
    "small": _spec(
        vit(256, 6, 4, 16, 128, 1024), llama(512, 6, 8, 2, 1376, 1024, rms_norm_eps=1e-5, vocab_size=8192), 4, 256, 8192
    ),
    "paper": _spec(
        vit(1024, 24, 16, 14, 224, 4096),
        llama(2048, 22, 32, 4, 5632, 2048, rms_norm_eps=1e-5, vocab_size=32000),
        4,
        768,
        32000,
    ),
}


def architecture(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset `name` (safe to modify) with `overrides` applied; dict values (`vision_config`,
    `text_config`) update the preset's dict instead of replacing it."""
    if name not in PRESETS:
        raise ValueError(f"Unknown architecture preset {name!r}; choose from {sorted(PRESETS)}.")
    spec = copy.deepcopy(PRESETS[name])
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return spec


__all__ = ["PRESETS", "architecture", "llama", "vit"]
