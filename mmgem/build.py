"""Build MM-GEM models from configs: a tokenizer trained on the project's own texts, and tiny models for tests,
notebooks, benchmarks and the demo. Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

from mmgem.presets import architecture
from modeling_mmgem.configuration_mmgem import MMGEMConfig
from modeling_mmgem.modeling_mmgem import MMGEMModel
from modeling_mmgem.processing_mmgem import MMGEMProcessor, add_mmgem_special_tokens
from modeling_mmgem.utils_mmgem import pil_image_processor_class

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
TINY_VISION_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (lossless decoding), with `<s>`, `</s>`, `<unk>`, `<pad>`.

    It adds `<s>` itself in MM-GEM's layouts (the processor assembles the ids), so no post-processor is set.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=model_max_length,
    )


def image_processor_for(vision_config: PretrainedConfig) -> Any:
    """The PIL-backed image processor matching a CLIP or SigLIP vision config (no torchvision needed)."""
    size = vision_config.image_size
    if vision_config.model_type.startswith("siglip"):
        return pil_image_processor_class("SiglipImageProcessor")(size={"height": size, "width": size})
    cls = pil_image_processor_class("CLIPImageProcessor")
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_mmgem(
    vision_config: PretrainedConfig | dict,
    text_config: PretrainedConfig | dict,
    tokenizer: Any,
    image_processor: Any | None = None,
    vocab_size: int | None = None,
    device: str | torch.device | None = None,
    **mmgem_kwargs: Any,
) -> tuple[MMGEMModel, MMGEMProcessor]:
    """A randomly initialised MM-GEM and its processor; the special tokens are added to `tokenizer`.

    Args:
        vision_config, text_config: configs or dicts (with `model_type`; default CLIP vision and Llama).
        tokenizer: the tokenizer; the MM-GEM special tokens (and a pad token) are added to it.
        image_processor: default: the PIL-backed processor matching `vision_config` (`image_processor_for`).
        vocab_size: rows of the language model's embedding table; default the tokenizer's size (the special tokens
            are then added by resizing). A larger table leaves spare rows, as the benchmarks use to give a random
            model the embedding size of a real one.
        device: where the weights are created (e.g. directly on a GPU, with no CPU copy of a large model).
        mmgem_kwargs: other `MMGEMConfig` arguments (`pool_grid_size`, `projection_dim`, ...).
    """
    if isinstance(text_config, dict):
        text_config = dict(text_config)
        text_config = AutoConfig.for_model(text_config.pop("model_type", "llama"), **text_config)
    if isinstance(vision_config, dict):
        vision_config = dict(vision_config)
        vision_config = AutoConfig.for_model(vision_config.pop("model_type", "clip_vision_model"), **vision_config)
    text_config.vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    config = MMGEMConfig(vision_config=vision_config, text_config=text_config, **mmgem_kwargs)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = MMGEMModel(config)
    add_mmgem_special_tokens(tokenizer, model)
    processor = MMGEMProcessor(
        image_processor=image_processor or image_processor_for(config.vision_config),
        tokenizer=tokenizer,
        num_image_tokens=config.num_image_tokens,
        context_length=getattr(config.text_config, "max_position_embeddings", None),
    )
    return model, processor


def tiny_configs(
    vision: str = "clip", text: str = "llama", image_size: int = 32, patch_size: int = 8, hidden: int = 32
) -> tuple[dict, dict]:
    """The `tiny` preset's vision and text configs (2 layers) for tests: `vision` in {clip, siglip}, `text` in
    {llama, qwen2}, with the image size, patch size and width changed if asked."""
    spec = architecture("tiny")
    vision_config, text_config = spec["vision_config"], spec["text_config"]
    vision_config.update(model_type=TINY_VISION_TYPES[vision], image_size=image_size, patch_size=patch_size)
    if vision == "siglip":
        vision_config["vision_use_head"] = False
    text_config["model_type"] = text
    for config in (vision_config, text_config):
        config.update(hidden_size=hidden, intermediate_size=2 * hidden)
    return vision_config, text_config


def tiny_mmgem(
    texts: Iterable[str] | None = None,
    vision: str = "clip",
    text: str = "llama",
    vocab_size: int = 300,
    **mmgem_kwargs: Any,
) -> tuple[MMGEMModel, MMGEMProcessor]:
    """A tiny random MM-GEM (hidden 32, 2 layers, 32 px images, 4x4 patch grid) and its processor."""
    corpus = list(texts) if texts is not None else DEFAULT_CORPUS
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size, model_max_length=256)
    vision_config, text_config = tiny_configs(vision, text)
    mmgem_kwargs.setdefault("pool_grid_size", 2)
    mmgem_kwargs.setdefault("projection_dim", 32)
    return build_mmgem(vision_config, text_config, tokenizer, **mmgem_kwargs)


DEFAULT_CORPUS = [
    f"a {size} {colour} {shape} on the {side}"
    for size in ("small", "large")
    for colour in ("red", "green", "blue", "yellow", "purple", "orange")
    for shape in ("circle", "square", "triangle", "star")
    for side in ("left", "right", "top", "bottom")
]
