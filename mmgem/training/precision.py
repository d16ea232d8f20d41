"""Per-part numerics while training: the attention kernels, and autocast for the two towers alone.

On a CPU with bf16 instructions (AVX-512 BF16, AMX), bf16 matrix products of the demo's sizes run 2-2.5x as fast as
fp32 ones, which pays only where the products outweigh the casts around them. Autocasting the two towers (the
vision tower and the language model's decoder layers) while the heads, projections, pooling and losses stay in fp32,
with eager attention (PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32), trains the demo's model
1.44x as fast as fp32 on a 2-core CPU with AVX-512 BF16, and 1.12x as fast as autocasting the whole model
(`benchmarks/demo_speed.py`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

AUTOCAST_DTYPES = ("bfloat16", "float16")
# What `attn_implementation` may name: implementations that ship with transformers (no kernel downloaded from a hub).
BUILT_IN_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_attention(value: str | None) -> None:
    """Refuse an `attn_implementation` that is not one of `BUILT_IN_ATTENTION` (None: keep the model's)."""
    if value is not None and value not in BUILT_IN_ATTENTION:
        raise ValueError(f"`attn_implementation` must be one of {BUILT_IN_ATTENTION} (or left out); got {value!r}.")


def check_autocast_dtype(value: str | None) -> None:
    """Refuse a `tower_autocast_dtype` that is not one of `AUTOCAST_DTYPES` (None: no autocast)."""
    if value is not None and value not in AUTOCAST_DTYPES:
        raise ValueError(f"`tower_autocast_dtype` must be one of {AUTOCAST_DTYPES} (or left out); got {value!r}.")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 products natively (AVX-512 BF16 or AMX), where bf16 autocast speeds them up;
    elsewhere torch emulates them, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def towers(model: Any) -> dict[str, torch.nn.Module]:
    """The two towers of an MM-GEM (also under a PEFT wrapper): the vision tower and the language model's decoder
    layers (`get_decoder()`: without the LM head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"vision": base.vision_model, "language": base.language_model.get_decoder()}


@contextlib.contextmanager
def autocast_forward(module: torch.nn.Module, dtype: str) -> Iterator[None]:
    """Inside the block, every call of `module` runs under `torch.autocast` in `dtype`, on the device of its
    parameters. After it (also after an error) the module's forward is what it was."""
    check_autocast_dtype(dtype)
    own = module.__dict__.get("forward")  # an instance-level forward someone set (e.g. accelerate's hooks)
    forward = module.forward

    @functools.wraps(forward)
    def forward_in_autocast(*args: Any, **kwargs: Any) -> Any:
        device_type = next(module.parameters()).device.type
        with torch.autocast(device_type, dtype=getattr(torch, dtype)):
            return forward(*args, **kwargs)

    module.forward = forward_in_autocast
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


@contextlib.contextmanager
def tower_autocast(model: Any, dtype: str | None) -> Iterator[None]:
    """Inside the block, both towers of `model` run under `torch.autocast` in `dtype`; the LM head, the projections
    (h1, h2, h3), the pooling and the losses keep the model's precision. `dtype` None: nothing changes.

    Autocast leaves a tower's outputs in fp32 where its last operation is a normalisation (the final LayerNorm or
    RMSNorm of CLIP, SigLIP and Llama-family towers). The parameters, their gradients and the optimizer stay in the
    model's dtype."""
    if dtype is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        for module in towers(model).values():
            stack.enter_context(autocast_forward(module, dtype))
        yield
