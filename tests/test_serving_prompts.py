"""The prompt helpers of the vLLM plugin (`mmgem.serving.vllm`), which import without vLLM: tokenized as vLLM
tokenizes prompts, they give the processor's token layouts. The engines themselves are tested in `tests_serve/`
(`make test-serve`, its own venv)."""

from __future__ import annotations

import pytest

from mmgem.build import tiny_mmgem
from mmgem.serving.vllm import caption_prompt, image_prompt, text_prompt

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def processor():
    return tiny_mmgem()[1]


@pytest.mark.parametrize("text", ["red", "a small red circle on the left", "  spaced  out  ", "ünïcode 🙂"])
def test_text_prompt_tokenizes_to_the_embedding_layout(processor, text):
    tokenizer = processor.tokenizer
    ids = tokenizer(text_prompt(text, tokenizer), add_special_tokens=True)["input_ids"]
    assert ids == processor(text=[text])["input_ids"][0].tolist()


def test_caption_and_image_prompts_are_control_tokens_only(processor):
    tokenizer = processor.tokenizer
    ids = tokenizer(caption_prompt(), add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("[CAP]")]
    assert tokenizer(image_prompt(), add_special_tokens=False)["input_ids"] == ids[:1]


@pytest.mark.parametrize("text", ["", "   ", None, 3])
def test_text_prompt_refuses_empty_or_non_text(processor, text):
    with pytest.raises(ValueError, match="`text` must be a non-empty string"):
        text_prompt(text, processor.tokenizer)
