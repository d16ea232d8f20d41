"""A tiny MM-GEM whose attention heads vLLM's CPU kernels accept (head size 32), saved as an exported folder, and
the engine settings the tests use."""

from __future__ import annotations

from pathlib import Path

import torch

from mmgem.build import DEFAULT_CORPUS, build_mmgem, train_tokenizer

# vLLM's CPU attention takes head sizes 32, 64, 80, ...: hidden 64 over 2 heads.
HIDDEN, HEADS = 64, 2
# float32 as the reference; eager (no torch.compile warm-up on 2 cores); a small share of the machine's memory.
ENGINE_ARGS = dict(dtype="float32", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1, seed=0)
SERVER_FLAGS = [
    "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--gpu-memory-utilization", "0.1",
]  # fmt: skip


def serve_test_folder(path: Path, vision: str = "clip", seed: int = 0) -> Path:
    """Save a random MM-GEM (2+2 layers, hidden 64, 32 px images, 4x4 patches pooled to 2x2, embeddings of 48) with
    its processor, as `save_pretrained` exports it."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(DEFAULT_CORPUS, vocab_size=300, model_max_length=256)
    vision_config = dict(
        model_type=f"{vision}_vision_model", image_size=32, patch_size=8, hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
    )  # fmt: skip
    if vision == "siglip":
        vision_config["vision_use_head"] = False
    text_config = dict(
        model_type="llama", hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    model, processor = build_mmgem(vision_config, text_config, tokenizer, pool_grid_size=2, projection_dim=48)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
