"""Behaviour that differs between transformers 5.x releases (CI runs these on the newest and the lowest admitted)."""

from __future__ import annotations

import pytest
import torch
from transformers import Cache

pytestmark = pytest.mark.fast


def test_forward_returns_the_kv_cache_under_both_names(tiny, images):
    """transformers >= 5.24 calls the cache `cache`; earlier releases look it up in outputs as `past_key_values`."""
    model, processor = tiny
    with torch.no_grad():
        output = model(**processor(images=images[:1]), use_cache=True)
    assert isinstance(output.cache, Cache)
    assert output.past_key_values is output.cache
    assert "past_key_values" in output


def test_assisted_generation_equals_greedy(tiny, images):
    """Prompt-lookup decoding crops the cache it reads back from the model output, under the release's name."""
    model, processor = tiny
    inputs = processor(images=images[:1])
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        assisted = model.generate(**inputs, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=2)
    assert torch.equal(assisted, greedy)
