"""The generate engine (`LLM(FOLDER, runner="generate")`): greedy captions token for token equal to `generate`."""

from __future__ import annotations

import pytest
import torch

from mmgem.serving.vllm import caption_prompt
from tests_serve.conftest import start_llm, stop_llm

MAX_TOKENS = 12

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def llm(folder):
    engine = start_llm(folder, "generate")
    yield engine
    stop_llm(engine)


def reference_tokens(reference, images, boxes=None) -> list[list[int]]:
    """Greedy caption tokens of `MMGEMModel.generate`, one image (or region) at a time, up to and with `<eos>`."""
    model, processor = reference
    rows = []
    for i, image in enumerate(images):
        inputs = processor(images=[image], boxes=None if boxes is None else [[boxes[i]]])
        kwargs = {"boxes": inputs["boxes"]} if boxes is not None else {}
        with torch.no_grad():
            ids = model.generate(
                pixel_values=inputs["pixel_values"], max_new_tokens=MAX_TOKENS, do_sample=False, **kwargs
            )
        rows.append(ids[0, inputs["input_ids"].shape[1] :].tolist())
    return rows


def generated_tokens(llm, images, boxes=None) -> list[list[int]]:
    from vllm import SamplingParams

    requests = []
    for i, image in enumerate(images):
        request = {"prompt": caption_prompt(), "multi_modal_data": {"image": image}}
        if boxes is not None:
            request["mm_processor_kwargs"] = {"box": boxes[i]}
        requests.append(request)
    outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    return [list(o.outputs[0].token_ids) for o in outputs]


def trim(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def test_greedy_captions_equal_generate_token_for_token(llm, reference, images):
    eos = reference[0].generation_config.eos_token_id
    expected = trim(reference_tokens(reference, images), eos)
    assert trim(generated_tokens(llm, images), eos) == expected
    assert all(len(row) > 1 for row in expected)


def test_prompt_tokens_are_the_caption_layout(llm, reference, images):
    _, processor = reference
    from vllm import SamplingParams

    output = llm.generate(
        [{"prompt": caption_prompt(), "multi_modal_data": {"image": images[0]}}], SamplingParams(max_tokens=1)
    )[0]
    assert output.prompt_token_ids == processor(images=[images[0]])["input_ids"][0].tolist()


def test_region_captions_through_mm_processor_kwargs(llm, reference, images):
    eos = reference[0].generation_config.eos_token_id
    boxes = [[4, 2, 30, 28], [0, 0, 16, 32], [10, 10, 50, 60]]
    expected = trim(reference_tokens(reference, images, boxes), eos)
    assert trim(generated_tokens(llm, images, boxes), eos) == expected
