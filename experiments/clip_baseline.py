"""The CLIP-style baseline of the long-text experiment: transformers' `CLIPModel` with a 77-token text encoder.

It is built to differ from the MM-GEM arm only where CLIP differs by design:

- vision tower: the same `clip_vision_model` config as MM-GEM (CLIP pools the CLS token, MM-GEM the patch mean);
- text encoder: a CLIP text transformer with the hidden size, depth, heads and MLP width of MM-GEM's LLM, but
  learned absolute positions for 77 tokens, so texts are cut to `<bos> 75 tokens <eot>` as CLIP's tokenizer does;
- tokenizer: the project's byte-level BPE (`mmgem.build.train_tokenizer`) trained on the same texts with the
  same vocabulary size as the MM-GEM arm, plus one end-of-text token CLIP pools at;
- training: the HF Trainer with the same `TrainingArguments` values (steps, batch, learning-rate schedule, seed) as
  the MM-GEM arm, on the same dataset items (`mmgem.data.records.ImageCaptionDataset`);
- evaluation: `ClipProcessor` gives `mmgem.evaluation.evaluate.evaluate_model` the calls it makes on an MM-GEM
  processor, so CLIP is scored by the very same retrieval code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature, CLIPConfig, CLIPModel, CLIPVisionConfig, Trainer, TrainingArguments

from mmgem.build import image_processor_for, train_tokenizer

CLIP_CONTEXT = 77  # CLIP's text length, special tokens included
EOT_TOKEN = "<|endoftext|>"


class ClipProcessor:
    """Images and texts to `CLIPModel` inputs: `<bos> text <eot>`, cut to `max_length` tokens, right padded.

    Callable like `MMGEMProcessor` for what `mmgem.evaluation.evaluate` needs: `processor(text=[...],
    truncation=True)` and `processor(images=[...])["pixel_values"]`; with both, a training batch.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, max_length: int = CLIP_CONTEXT) -> None:
        if max_length < 3:
            raise ValueError(f"`max_length` must leave room for <bos>, a token and <eot>; got {max_length}.")
        if EOT_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [EOT_TOKEN]})
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eot_token_id = tokenizer.convert_tokens_to_ids(EOT_TOKEN)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode_texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and mask `[B, L <= max_length]`; longer texts are cut, as CLIP's tokenizer does."""
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"`text[{i}]` must be a non-empty string; got {text!r}.")
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length - 2]
            rows.append([self.tokenizer.bos_token_id, *tokens, self.eot_token_id])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, images: Any = None, text: Any = None, truncation: bool = True, **kwargs: Any) -> BatchFeature:
        # `truncation` is accepted for the evaluation code's sake: CLIP always cuts at its context length.
        if images is None and text is None:
            raise ValueError("Give `images`, `text`, or both.")
        data: dict[str, Any] = {}
        if text is not None:
            data.update(self.encode_texts([text] if isinstance(text, str) else list(text)))
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            pil = [image.convert("RGB") for image in images]
            data["pixel_values"] = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        return BatchFeature(data)


class ClipCollator:
    """Dataset items (`{"image", "caption", ...}`) to a `CLIPModel` training batch with `return_loss=True`."""

    def __init__(self, processor: ClipProcessor) -> None:
        self.processor = processor

    def __call__(self, items: Sequence[dict[str, Any]]) -> BatchFeature:
        batch = self.processor(images=[item["image"] for item in items], text=[item["caption"] for item in items])
        batch["return_loss"] = True
        return batch


def clip_config(spec: dict[str, Any], processor: ClipProcessor) -> CLIPConfig:
    """A `CLIPConfig` matching an MM-GEM architecture spec (see the module docstring)."""
    vision = {k: v for k, v in spec["vision_config"].items() if k != "model_type"}
    llm = spec["text_config"]
    tokenizer = processor.tokenizer
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": llm["hidden_size"],
        "intermediate_size": llm["intermediate_size"],
        "num_hidden_layers": llm["num_hidden_layers"],
        "num_attention_heads": llm["num_attention_heads"],
        "max_position_embeddings": processor.max_length,
        # An end token other than 2: CLIPTextTransformer keeps a legacy argmax pooling for eos_token_id == 2.
        "eos_token_id": processor.eot_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.get("projection_dim", 512))


def build_clip(
    spec: dict[str, Any], texts: Sequence[str], max_length: int = CLIP_CONTEXT
) -> tuple[CLIPModel, ClipProcessor]:
    """A random `CLIPModel` and its processor; the tokenizer is trained on `texts` like MM-GEM's."""
    # The processor cuts texts to `max_length` itself; a larger tokenizer limit keeps it from warning about long texts.
    tokenizer = train_tokenizer(texts, vocab_size=spec.get("vocab_size", 512), model_max_length=100_000)
    vision = CLIPVisionConfig(**{k: v for k, v in spec["vision_config"].items() if k != "model_type"})
    processor = ClipProcessor(image_processor_for(vision), tokenizer, max_length)
    model = CLIPModel(clip_config(spec, processor))
    # The Trainer must not pass `num_items_in_batch` through CLIP's **kwargs into the towers.
    model.accepts_loss_kwargs = False
    return model, processor


def train_clip(
    model: CLIPModel, processor: ClipProcessor, dataset: Any, output_dir: str | Path, training_options: dict[str, Any]
) -> dict[str, Any]:
    """Train `model` in place with the HF Trainer on `dataset` items; nothing is saved. Returns the train metrics.

    `training_options` are the `TrainingArguments` values shared with the MM-GEM arms.
    """
    args = TrainingArguments(output_dir=str(output_dir), remove_unused_columns=False, **training_options)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=ClipCollator(processor))
    return dict(trainer.train().metrics)
