"""Fixtures for the search and app tests: a tiny random MM-GEM whose outputs tell images apart, and drawn images.

A tiny MM-GEM at transformers' default init (std 0.02) maps every text to nearly the same vector (cosines
> 0.9999) and captions with stray bytes. Re-drawing its weight matrices with std 0.3 spreads texts and images out
(cosines between unrelated inputs about -0.1 to 0.8), and suppressing every token that is not a plain ASCII word
piece makes captions printable, so that a test can read a caption from a web page and find an image by it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmgem.build import tiny_mmgem
from mmgem.synthetic import render_scene

PAIRS = [
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "star"),
    ("purple", "cross"),
    ("orange", "diamond"),
    ("cyan", "circle"),
    ("black", "square"),
]


def readable_tiny_mmgem(seed: int = 0):
    """A tiny MM-GEM (eval mode) with spread-out embeddings and ASCII-word captions, and its processor."""
    torch.manual_seed(seed)
    model, processor = tiny_mmgem()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and "norm" not in name:
                parameter.normal_(0.0, 0.3)
    tokenizer = processor.tokenizer

    def is_word_piece(token_id: int) -> bool:
        text = tokenizer.decode([token_id])
        return text.isascii() and text.replace(" ", "").isalpha()

    keep = {i for i in range(len(tokenizer)) if is_word_piece(i)} | {tokenizer.eos_token_id}
    special = [model.config.image_token_id, model.config.emb_token_id, model.config.cap_token_id]
    model.generation_config.suppress_tokens = sorted({i for i in range(len(tokenizer)) if i not in keep} | set(special))
    model.generation_config.max_new_tokens = 12
    return model.eval(), processor


def save_model(model, processor, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def draw_images(folder: Path, count: int, size: int = 64, seed: int = 0, start: int = 0) -> list[Path]:
    """`count` synthetic one-shape scenes as PNGs named `shape_<i>.png` (distinct colour-shape pairs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + start)
    paths = []
    for i in range(start, start + count):
        image, _, _ = render_scene(rng, size, 1, [PAIRS[i % len(PAIRS)]])
        path = folder / f"shape_{i}.png"
        image.save(path)
        paths.append(path)
    return paths
