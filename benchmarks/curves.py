"""Scaling curves: visual tokens per image vs caption latency, text length vs embedding latency, batch size vs
throughput. Each returns JSON-ready points; `plot_curves` draws them as PNGs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .baselines import llava_prompt
from .comparisons import SuiteContext, generation_kwargs
from .timing import interleaved, median
from .workloads import embedding_batch, pixel_values

CLIP_TEXT_CONTEXT = 77  # CLIP's text encoder stops here; MM-GEM's LLM reads up to its own context


@contextmanager
def pool_grid(model: Any, k: int) -> Iterator[None]:
    """Temporarily pool to a `k x k` grid (the weights do not depend on k; only the number of visual tokens does)."""
    config, aggregator = model.config, model.pool_aggregator
    saved = config.pool_grid_size, aggregator.grid_size, aggregator.sampling_ratio
    config.pool_grid_size = k
    aggregator.grid_size = k
    aggregator.sampling_ratio = config.region_sampling_ratio or -(-aggregator.patch_grid_size // k)
    try:
        yield
    finally:
        config.pool_grid_size, aggregator.grid_size, aggregator.sampling_ratio = saved


def _grid_sides(grid: int, quick: bool, default: int) -> list[int]:
    """Pool grid sides from 1x1 to the full patch grid: the divisors and powers of two (fewer in quick mode)."""
    if quick:
        return sorted({1, default, grid})
    return sorted({k for k in range(1, grid + 1) if grid % k == 0 or k & (k - 1) == 0})


def visual_tokens_curve(ctx: SuiteContext) -> dict[str, Any]:
    """Caption latency (first token, and a whole caption) of one image vs visual tokens per image, with LLaVA on the
    same tower and LM (all patch tokens) as the reference point."""
    bm, model = ctx.bm, ctx.bm.model
    steps = bm.spec.decode_tokens
    pixels = pixel_values(bm, 1)
    one, many = generation_kwargs(bm, 1), generation_kwargs(bm, steps)
    points = []
    for k in _grid_sides(bm.config.patch_grid_size, ctx.quick, bm.spec.pool_grid_size):
        with pool_grid(model, k):
            samples = interleaved(
                {
                    "first": lambda: model.generate(pixel_values=pixels, **one),
                    "caption": lambda: model.generate(pixel_values=pixels, **many),
                },
                bm.device,
                ctx.plan,
            )
        points.append(
            {
                "visual_tokens": k * k,
                "pool_grid": k,
                "first_token_s": median(samples["first"]),
                "caption_s": median(samples["caption"]),
            }
        )
    llava, prompt = ctx.llava(), llava_prompt(bm, 1)
    samples = interleaved(
        {
            "first": lambda: llava.generate(input_ids=prompt, pixel_values=pixels, **one),
            "caption": lambda: llava.generate(input_ids=prompt, pixel_values=pixels, **many),
        },
        bm.device,
        ctx.plan,
    )
    reference = {
        "visual_tokens": bm.config.patch_grid_size**2,
        "first_token_s": median(samples["first"]),
        "caption_s": median(samples["caption"]),
    }
    return {"name": "visual_tokens", "new_tokens": steps, "batch": 1, "points": points, "llava": reference}


def _lengths(context: int, quick: bool) -> list[int]:
    top = min(context, 256) if quick else context
    lengths, n = [], 16
    while n < top:
        lengths.append(n)
        n *= 2
    lengths.append(top)
    if CLIP_TEXT_CONTEXT < top:
        lengths.append(CLIP_TEXT_CONTEXT)  # a point at CLIP's limit, for the comparison in the README
    return sorted(set(lengths))


def text_length_curve(ctx: SuiteContext) -> dict[str, Any]:
    """Text-embedding latency of one text vs its length in tokens (`[EMB]` included), up to the LM's context."""
    bm, model = ctx.bm, ctx.bm.model
    points = []
    with torch.inference_mode():
        for length in _lengths(bm.spec.context, ctx.quick):
            inputs = embedding_batch(bm, 1, length)
            timed = {"ours": lambda inputs=inputs: model.get_text_features(**inputs)}
            samples = interleaved(timed, bm.device, ctx.plan)
            points.append({"tokens": length, "seconds": median(samples["ours"])})
    return {
        "name": "text_length",
        "batch": 1,
        "context": bm.spec.context,
        "clip_context": CLIP_TEXT_CONTEXT,
        "points": points,
    }


def batch_curve(ctx: SuiteContext) -> dict[str, Any]:
    """Throughput (items per second) of image embedding, text embedding and captioning vs batch size."""
    bm, model = ctx.bm, ctx.bm.model
    batches = bm.spec.curve_batches[:3] if ctx.quick else bm.spec.curve_batches
    many = generation_kwargs(bm, bm.spec.decode_tokens)
    points = []
    for b in batches:
        pixels = pixel_values(bm, b)
        texts = embedding_batch(bm, b, bm.spec.text_length)
        with torch.inference_mode():
            samples = interleaved(
                {
                    "image": lambda pixels=pixels: model.get_image_features(pixel_values=pixels),
                    "text": lambda texts=texts: model.get_text_features(**texts),
                    "caption": lambda pixels=pixels: model.generate(pixel_values=pixels, **many),
                },
                bm.device,
                ctx.plan,
            )
        points.append({"batch": b, **{f"{key}_per_s": b / median(value) for key, value in samples.items()}})
    return {"name": "batch", "text_length": bm.spec.text_length, "new_tokens": bm.spec.decode_tokens, "points": points}


def plot_curves(curves: dict[str, dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """One PNG per curve in `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if "visual_tokens" in curves:
        c = curves["visual_tokens"]
        fig, ax = plt.subplots(figsize=(6, 4))
        x = [p["visual_tokens"] for p in c["points"]]
        ax.plot(x, [p["first_token_s"] * 1e3 for p in c["points"]], "o-", label="MM-GEM first token")
        ax.plot(x, [p["caption_s"] * 1e3 for p in c["points"]], "s-", label=f"MM-GEM {c['new_tokens']}-token caption")
        ref = c["llava"]
        ax.plot([ref["visual_tokens"]], [ref["first_token_s"] * 1e3], "o", color="C3", label="LLaVA first token")
        ax.plot([ref["visual_tokens"]], [ref["caption_s"] * 1e3], "s", color="C3", mfc="none", label="LLaVA caption")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens per image (pool grid k x k)")
        ax.set_ylabel("latency, one image (ms)")
        paths.append(_save(fig, ax, folder / "curve_visual_tokens.png", title))
    if "text_length" in curves:
        c = curves["text_length"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            [p["tokens"] for p in c["points"]],
            [p["seconds"] * 1e3 for p in c["points"]],
            "o-",
            label="MM-GEM get_text_features",
        )
        ax.axvline(c["clip_context"], color="gray", ls="--", label=f"CLIP text limit ({c['clip_context']})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("text length (tokens)")
        ax.set_ylabel("latency, one text (ms)")
        paths.append(_save(fig, ax, folder / "curve_text_length.png", title))
    if "batch" in curves:
        c = curves["batch"]
        fig, ax = plt.subplots(figsize=(6, 4))
        x = [p["batch"] for p in c["points"]]
        for key, label in (
            ("image", "image embeddings"),
            ("text", f"text embeddings ({c['text_length']} tok)"),
            ("caption", f"captions ({c['new_tokens']} tok)"),
        ):
            ax.plot(x, [p[f"{key}_per_s"] for p in c["points"]], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("items per second")
        paths.append(_save(fig, ax, folder / "curve_batch.png", title))
    return paths


def _save(fig: Any, ax: Any, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
