"""Generation checks of transformers' `GenerationTesterMixin`, which its sdist does not publish, written here for
MMGEMModel on the conformance tier's tiny config: cache against no cache, static cache, compiled generation
(`_can_compile_fullgraph`), beam search against the language model's own beam search over the same prompt
embeddings, batched against single beam search, and assisted / prompt-lookup decoding against plain greedy."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

from modeling_mmgem.modeling_mmgem import MMGEMModel
from tests.conformance.tester import MMGEMModelTester

pytestmark = [pytest.mark.fast, pytest.mark.timeout(300)]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tester = MMGEMModelTester(None, batch_size=2)
    config, inputs = tester.prepare_config_and_inputs_for_common()
    model = MMGEMModel(config).eval()
    # A deterministic, non-trivial model: larger logits than the 0.02 init gives, so beams and greedy differ.
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(30.0)
    return model, inputs["pixel_values"], tester


def _new_tokens(model: MMGEMModel, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(pixel_values=pixel_values, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    prompt = 2 + model.config.num_image_tokens
    return out[:, prompt:]


def test_model_declares_full_graph_compilation():
    assert MMGEMModel._can_compile_fullgraph is True


def test_cache_equals_no_cache(setup):
    model, pixel_values, _ = setup
    torch.testing.assert_close(
        _new_tokens(model, pixel_values, use_cache=True), _new_tokens(model, pixel_values, use_cache=False)
    )


def test_static_cache_equals_dynamic_cache(setup):
    model, pixel_values, _ = setup
    torch.testing.assert_close(
        _new_tokens(model, pixel_values, cache_implementation="static"), _new_tokens(model, pixel_values)
    )


def test_compiled_static_cache_generation_equals_eager(setup):
    """The decoding steps run through `torch.compile(fullgraph=True)` (what `_can_compile_fullgraph` promises):
    a graph break would raise. The `eager` backend checks the tracing without compiling kernels (CPU CI)."""
    model, pixel_values, _ = setup
    torch._dynamo.reset()
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None, dynamic=False)
    compile_config._compile_all_devices = True
    compiled = _new_tokens(model, pixel_values, cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call"), "generate did not compile the decoding step"
    torch.testing.assert_close(compiled, _new_tokens(model, pixel_values))


def test_beam_search_equals_the_language_models_beam_search(setup):
    """MM-GEM's beam search (visual tokens expanded per beam) = the language model's own beam search over the same
    prompt embeddings (the `<image>` rows replaced by the visual tokens)."""
    model, pixel_values, _ = setup
    ours = _new_tokens(model, pixel_values, num_beams=3)
    input_ids, attention_mask = model._default_caption_prompt(pixel_values.shape[0], model.device)
    with torch.no_grad():
        embeds = model._merge_visual_tokens(input_ids, None, model.get_visual_tokens(pixel_values))
        theirs = model.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=NEW_TOKENS,
            num_beams=3,
            do_sample=False,
            suppress_tokens=[model.config.image_token_id, model.config.emb_token_id, model.config.cap_token_id],
        )
    torch.testing.assert_close(ours, theirs)


def test_beam_search_differs_from_greedy_and_batched_equals_single(setup):
    model, pixel_values, _ = setup
    beams = _new_tokens(model, pixel_values, num_beams=3)
    assert not torch.equal(beams, _new_tokens(model, pixel_values)), "num_beams=3 gave the greedy captions"
    single = torch.cat([_new_tokens(model, pixel_values[i : i + 1], num_beams=3) for i in range(2)])
    torch.testing.assert_close(beams, single)
    with torch.no_grad():
        scores = model.generate(
            pixel_values=pixel_values,
            max_new_tokens=NEW_TOKENS,
            num_beams=3,
            num_return_sequences=3,
            output_scores=True,
            return_dict_in_generate=True,
        ).sequences_scores
    assert scores.shape == (6,) and torch.isfinite(scores).all()


def test_assisted_and_prompt_lookup_decoding_equal_greedy_without_cache(setup):
    model, pixel_values, _ = setup
    image = pixel_values[:1]  # assisted decoding takes one sequence
    greedy = _new_tokens(model, image, use_cache=False)
    torch.testing.assert_close(_new_tokens(model, image, assistant_model=model), greedy)
    torch.testing.assert_close(_new_tokens(model, image, prompt_lookup_num_tokens=2), greedy)
