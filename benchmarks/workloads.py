"""Synthetic inputs of the benchmark workloads: random pixels and token ids shaped like real batches."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmgem.build import DEFAULT_CORPUS

from .sizes import BenchModel

IGNORE_INDEX = -100


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pixel_values(bm: BenchModel, batch: int, seed: int = 0) -> torch.Tensor:
    """`[batch, 3, S, S]` normalised-looking pixels on the model's device and dtype."""
    size = bm.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=_generator(seed))
    return pixels.to(bm.device, bm.dtype)


def random_tokens(bm: BenchModel, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """`[batch, length]` ids of ordinary tokens (no special token)."""
    ids = bm.regular_token_ids
    return torch.randint(ids.start, ids.stop, (batch, length), generator=_generator(seed))


def embedding_batch(bm: BenchModel, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`<bos> text [EMB]` rows of varied lengths (longest = `length`), right padded, as the processor makes them."""
    cfg = bm.config
    gen = _generator(seed + 1)
    lengths = [length] + torch.randint(max(3, length // 2), length + 1, (batch - 1,), generator=gen).tolist()
    ids = torch.full((batch, length), cfg.text_config.pad_token_id, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    body = random_tokens(bm, batch, length, seed)
    for row, n in enumerate(lengths):
        ids[row, :n] = body[row, :n]
        ids[row, 0] = cfg.text_config.bos_token_id
        ids[row, n - 1] = cfg.emb_token_id
        mask[row, :n] = 1
    return {"input_ids": ids.to(bm.device), "attention_mask": mask.to(bm.device)}


def caption_prefix(bm: BenchModel, batch: int) -> torch.Tensor:
    """The default caption prompt `<bos> <image>*K [CAP]`: what `generate(pixel_values=...)` builds."""
    cfg = bm.config
    row = [cfg.text_config.bos_token_id] + [cfg.image_token_id] * cfg.num_image_tokens + [cfg.cap_token_id]
    return torch.tensor([row] * batch, device=bm.device)


def training_batch(bm: BenchModel, batch: int, text_length: int, caption_length: int) -> dict[str, torch.Tensor]:
    """A joint training batch: images, their texts (`<bos> text [EMB]`) and caption sequences with labels."""
    cfg = bm.config
    prefix = caption_prefix(bm, batch)
    caption = random_tokens(bm, batch, caption_length, seed=7).to(bm.device)
    eos = torch.full((batch, 1), cfg.text_config.eos_token_id, device=bm.device)
    input_ids = torch.cat([prefix, caption, eos], dim=1)
    labels = input_ids.clone()
    labels[:, : prefix.shape[1]] = IGNORE_INDEX
    texts = embedding_batch(bm, batch, text_length, seed=3)
    return {
        "pixel_values": pixel_values(bm, batch, seed=5),
        "text_input_ids": texts["input_ids"],
        "text_attention_mask": texts["attention_mask"],
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
    }


def pil_images(bm: BenchModel, count: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images a bit larger than the model's input (so the processor resizes and crops, as in real use)."""
    size = bm.config.vision_config.image_size
    rng = np.random.RandomState(seed)
    return [
        Image.fromarray(rng.randint(0, 255, (size + size // 4, size + size // 2, 3), dtype=np.uint8))
        for _ in range(count)
    ]


def sentences(count: int, words: int, seed: int = 0) -> list[str]:
    """`count` texts of about `words` words drawn from the tokenizer's training corpus."""
    rng = np.random.RandomState(seed)
    vocab = sorted({w for text in DEFAULT_CORPUS for w in text.split()})
    return [" ".join(rng.choice(vocab, size=words)) for _ in range(count)]
