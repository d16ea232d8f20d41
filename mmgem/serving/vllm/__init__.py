"""MM-GEM in vLLM: a plugin that serves an exported MM-GEM folder with vLLM's engines.

Installed with `pip install "mmgem[vllm]"`, which declares the `vllm.general_plugins` entry point: every vLLM
process then calls `register()`, and `vllm serve FOLDER` / `LLM(FOLDER)` load the folder as it is (no conversion).

One architecture, two engines (vLLM picks one runner per engine):

- `--runner pooling` (`LLM(..., runner="pooling")`, `/v1/embeddings`): text embeddings (h3 of the hidden state at
  `[EMB]`, prompt `<bos> text [EMB]`, see `text_prompt`) and image embeddings (h1 of the pooled patch grid; prompt
  `<image>` with the image, the LM does not run for it).
- `--runner generate` (`/v1/chat/completions`, `LLM.generate`): captions, `<bos> <image>*K [CAP]` with the K h2
  visual tokens in place of the placeholders; the prompt is `<image>[CAP]`, as the folder's chat template renders.

A region instead of the whole image: `mm_processor_kwargs={"box": [x0, y0, x1, y1]}` (pixels of the original image),
one box per request, in both engines.
"""

from __future__ import annotations

from typing import Any

# Imported from the installed package, configuration_mmgem registers the `mmgem` model type with AutoConfig, so vLLM
# reads the folder's config.json without `--trust-remote-code`.
import modeling_mmgem.configuration_mmgem  # noqa: F401
from modeling_mmgem.processing_mmgem import CAP_TOKEN, EMB_TOKEN, IMAGE_TOKEN

ARCHITECTURE = "MMGEMModel"
MODEL_CLASS = "mmgem.serving.vllm.model:MMGEMForVllm"


def register() -> None:
    """Register MM-GEM's config with transformers and its architecture with vLLM's model registry.

    vLLM calls this in every process it starts (the `vllm.general_plugins` entry point), before loading a model.
    """
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # The class is named by string: vLLM imports it only in the processes that build the model.
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def text_prompt(text: str, tokenizer: Any) -> str:
    """The prompt of a text embedding request, `<bos> text [EMB]`, as a string for `LLM.embed` or `/v1/embeddings`.

    vLLM tokenizes prompts as they are and MM-GEM's tokenizer adds no special token itself, so the layout the model
    was trained on is spelled out here (the same ids `MMGEMProcessor(text=...)` builds).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"`text` must be a non-empty string; got {text!r}.")
    return f"{tokenizer.bos_token or ''}{text}{EMB_TOKEN}"


def image_prompt() -> str:
    """The prompt of an image embedding request (pass the image as `multi_modal_data={"image": image}`)."""
    return IMAGE_TOKEN


def caption_prompt() -> str:
    """The prompt of a caption request (with the image); the same text the folder's chat template renders."""
    return IMAGE_TOKEN + CAP_TOKEN


__all__ = ["ARCHITECTURE", "register", "text_prompt", "image_prompt", "caption_prompt"]
