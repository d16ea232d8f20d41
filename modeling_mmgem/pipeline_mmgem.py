"""transformers pipelines for MM-GEM, registered in the model folder through `config.custom_pipelines`.

    pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    pipeline("image-text-to-text", model=folder, trust_remote_code=True)      # captions; also the chat form
    pipeline("image-feature-extraction", model=folder, trust_remote_code=True)  # image embeddings
    pipeline("feature-extraction", model=folder, trust_remote_code=True)        # text embeddings

Each subclasses the stock pipeline of its task (same call signature, options and output format) and feeds the model
through `MMGEMProcessor`, so the token layouts (`<bos> text [EMB]`, `<bos> <image>*K [CAP]`) are the model's own.

Images given as paths, URLs or base64 strings are opened by MM-GEM's own loader (`processing_mmgem.load_rgb_image`,
through the processor), as every other entry point opens them: the same pixels (no EXIF rotation: region boxes are
pixel coordinates of the stored image), the same limits (`MMGEM_MAX_IMAGE_BYTES`, `MMGEM_MAX_IMAGE_PIXELS` checked
before decoding, URL downloads within `MMGEM_IMAGE_URL_TIMEOUT` seconds in all, or the pipeline's `timeout`).

This file is remote code: it travels to the Hub next to the weights and imports only transformers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    FeatureExtractionPipeline,
    GenerationConfig,
    ImageFeatureExtractionPipeline,
    ImageTextToTextPipeline,
    ZeroShotImageClassificationPipeline,
)
from transformers.image_utils import valid_images

from .configuration_mmgem import PIPELINE_CLASSES, custom_pipelines_config
from .image_loading_mmgem import load_rgb_image


class _MMGEMPipelineMixin:
    """Loads the MM-GEM processor and skips the stock model-type check (the model is remote code)."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def check_model_type(self, supported_models: Any) -> None:
        if not hasattr(self.model, "get_text_features") or not hasattr(self.model, "get_image_features"):
            raise ValueError(f"{type(self).__name__} needs an MM-GEM model; got {type(self.model).__name__}.")

    def _pixel_values(self, image: Any, timeout: float | None) -> torch.Tensor:
        return self.processor(images=[image], **_timeout_option(timeout))["pixel_values"].to(self.dtype)


def _timeout_option(timeout: float | None) -> dict[str, Any]:
    """The pipelines' `timeout` (seconds for a URL download) as the processor's image option."""
    return {} if timeout is None else {"images_kwargs": {"image_url_timeout": timeout}}


def _is_image_input(images: Any) -> bool:
    """Images (PIL, arrays, tensors) or references to images (a path, an http(s) URL, base64), or a list of them."""
    items = images if isinstance(images, (list, tuple)) else [images]
    return bool(items) and all(isinstance(item, (str, os.PathLike)) or valid_images(item) for item in items)


# Options of `generate` (beam search, sampling, lengths...), which the caption pipeline hands to `generate`: its
# stock parent would take the unknown ones for processor options and drop them.
_GENERATE_OPTIONS = frozenset(GenerationConfig().to_dict()) - {"max_length", "transformers_version"}
_GENERATE_OPTIONS |= {
    "assistant_model",
    "streamer",
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
}


class MMGEMZeroShotImageClassificationPipeline(_MMGEMPipelineMixin, ZeroShotImageClassificationPipeline):
    """Scores = softmax over the labels of `logit_scale * cos(image embedding, embedding of the templated label)`,
    so they rank the labels exactly as the cosine similarities do. `hypothesis_template` (default
    `"This is a photo of {}."`) and `tokenizer_kwargs` (`truncation`, `max_length`) are honoured."""

    def preprocess(
        self,
        image: Any,
        candidate_labels: list[str] | None = None,
        hypothesis_template: str = "This is a photo of {}.",
        timeout: float | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if not candidate_labels:
            raise ValueError("`candidate_labels` must be a non-empty list of label strings.")
        texts = [hypothesis_template.format(label) for label in candidate_labels]
        text_inputs = self.processor(text=texts, **(tokenizer_kwargs or {}))
        # Wrapped in a list so that the pipeline's batching does not collate the label texts of different images.
        return {
            "pixel_values": self._pixel_values(image, timeout),
            "candidate_labels": candidate_labels,
            "text_inputs": [dict(text_inputs)],
        }

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        candidate_labels = model_inputs.pop("candidate_labels")
        text_inputs = model_inputs.pop("text_inputs")
        text_inputs = text_inputs[0] if isinstance(text_inputs[0], dict) else text_inputs[0][0]
        text_inputs = {k: v.to(self.device) for k, v in text_inputs.items()}
        image_embeds = self.model.get_image_features(model_inputs["pixel_values"]).pooler_output  # [1, D]
        text_embeds = self.model.get_text_features(**text_inputs).pooler_output  # [labels, D]
        cosine = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T
        return {"candidate_labels": candidate_labels, "logits": self.model.logit_scale().float() * cosine}


class MMGEMImageTextToTextPipeline(_MMGEMPipelineMixin, ImageTextToTextPipeline):
    """Captions. `pipe(images=image)` (no prompt: MM-GEM captions without one) returns the caption that
    `model.generate(**processor(images=image))` gives; generation options (`max_new_tokens`, `num_beams`,
    `generate_kwargs`) pass through. The chat form `pipe(text=[{"role": "user", "content": [{"type": "image",
    "image": image}]}])` renders the processor's chat template (`<image>[CAP]`, `<bos>` and the K placeholders
    added by the processor) and gives the same caption; text in a user message is refused."""

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        if text is None and images is not None and _is_image_input(images):
            if isinstance(images, (list, tuple)):
                return [
                    super(ImageTextToTextPipeline, self).__call__({"images": image, "text": None}, **kwargs)
                    for image in images
                ]
            return super(ImageTextToTextPipeline, self).__call__({"images": images, "text": None}, **kwargs)
        return super().__call__(images=images, text=text, **kwargs)

    def _sanitize_parameters(self, generate_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> tuple:
        """As the stock pipeline's, with `generate` options given directly (`num_beams=3`, `do_sample=True`, ...) moved
        into `generate_kwargs`, as the README shows them."""
        moved = {key: kwargs.pop(key) for key in list(kwargs) if key in _GENERATE_OPTIONS and key != "max_new_tokens"}
        if moved:
            generate_kwargs = dict(generate_kwargs or {})
            for key, value in moved.items():
                if key in generate_kwargs:
                    raise ValueError(f"`{key}` is given twice: as an argument and in `generate_kwargs`.")
                generate_kwargs[key] = value
        return super()._sanitize_parameters(generate_kwargs=generate_kwargs, **kwargs)

    def preprocess(
        self,
        inputs: Any = None,
        timeout: float | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if isinstance(inputs, dict) and inputs.get("text") is None and "images" in inputs:
            kwargs.pop("continue_final_message", None)  # a chat option; there is no chat here
            options = {**kwargs, **(processor_kwargs or {}), **_timeout_option(timeout)}
            model_inputs = self.processor(images=inputs["images"], **options).to(dtype=self.dtype)
            model_inputs["text"] = ""  # no prompt text: the full text is the caption
            return model_inputs
        if processor_kwargs is not None:
            kwargs["processor_kwargs"] = processor_kwargs
        if hasattr(inputs, "messages"):  # the chat form: its images are opened here, by MM-GEM's loader
            inputs.messages = _chat_with_loaded_images(inputs.messages, timeout)
        return super().preprocess(inputs, timeout=timeout, **kwargs)


def _chat_with_loaded_images(messages: list[dict[str, Any]], timeout: float | None) -> list[dict[str, Any]]:
    """A copy of a chat whose image parts (`image`, `url` or `path`) hold RGB images opened by `load_rgb_image`, so
    that the chat form gives the pixels (and the limits) of every other entry point."""
    loaded = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    reference = next((part[key] for key in ("image", "url", "path") if part.get(key) is not None), None)
                    if reference is not None:
                        part = {k: v for k, v in part.items() if k not in ("url", "path")}
                        part["image"] = load_rgb_image(reference, len(parts), url_timeout=timeout)
                parts.append(part)
            message = {**message, "content": parts}
        loaded.append(message)
    return loaded


class MMGEMImageFeatureExtractionPipeline(_MMGEMPipelineMixin, ImageFeatureExtractionPipeline):
    """The image embedding `get_image_features(...).pooler_output` (not normalised), shape `[1, projection_dim]` per
    image (`return_tensors=True` for a tensor). `pool` is accepted for compatibility: the output is always the pooled
    embedding."""

    def preprocess(self, image: Any, timeout: float | None = None, **image_processor_kwargs: Any) -> dict[str, Any]:
        return {"pixel_values": self._pixel_values(image, timeout)}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        return {"embeds": self.model.get_image_features(model_inputs["pixel_values"]).pooler_output}

    def postprocess(self, model_outputs: dict[str, Any], pool: bool | None = None, return_tensors: bool = False) -> Any:
        embeds = model_outputs["embeds"]
        return embeds if return_tensors else embeds.tolist()


class MMGEMTextFeatureExtractionPipeline(_MMGEMPipelineMixin, FeatureExtractionPipeline):
    """The text embedding `get_text_features(...).pooler_output` (not normalised), shape `[1, projection_dim]` per
    text, never vocabulary logits. `truncation` / `tokenize_kwargs` (`max_length`) go to the processor."""

    def preprocess(self, inputs: str, **tokenize_kwargs: Any) -> dict[str, Any]:
        return dict(self.processor(text=inputs, **tokenize_kwargs))

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        return {"embeds": self.model.get_text_features(**model_inputs).pooler_output}

    def postprocess(self, model_outputs: dict[str, Any], return_tensors: bool = False) -> Any:
        embeds = model_outputs["embeds"]
        return embeds if return_tensors else embeds.tolist()


def pipeline_classes() -> dict[str, type]:
    """The pipeline class of each task in `config.custom_pipelines`."""
    return {task: globals()[name] for task, name in PIPELINE_CLASSES.items()}


__all__ = list(PIPELINE_CLASSES.values()) + ["PIPELINE_CLASSES", "custom_pipelines_config", "pipeline_classes"]
