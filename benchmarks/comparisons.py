"""The A/B comparisons of the suite. Each takes the shared `SuiteContext` and returns its records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .baselines import clip_style_image_head, llava_on_shared_weights, llava_prompt
from .loading import measure_in_subprocess, safetensors_bytes, save_baseline_checkpoints
from .report import Record
from .sizes import BenchModel
from .timing import TimingPlan, interleaved, median
from .workloads import (
    caption_prefix,
    embedding_batch,
    pil_images,
    pixel_values,
    random_tokens,
    sentences,
    training_batch,
)


@dataclass
class SuiteContext:
    """What every comparison and curve needs: the model, how hard to measure, and where to put files."""

    bm: BenchModel
    plan: TimingPlan
    workdir: Path
    quick: bool
    threads: int
    cache: dict[str, Any] = field(default_factory=dict)

    def record(self, name: str, ours_s: float, baseline: str, baseline_s: float, batch: int, **kw: Any) -> Record:
        return Record(
            name=name,
            ours_s=ours_s,
            baseline=baseline,
            baseline_s=baseline_s,
            size=self.bm.spec.name,
            device=str(self.bm.device),
            dtype=str(self.bm.dtype).removeprefix("torch."),
            batch=batch,
            **kw,
        )

    def ab(self, ours: Callable[[], object], baseline: Callable[[], object]) -> tuple[float, float]:
        """Median seconds per call of both sides, timed interleaved."""
        samples = interleaved({"ours": ours, "baseline": baseline}, self.bm.device, self.plan)
        return median(samples["ours"]), median(samples["baseline"])

    def saved_checkpoint(self) -> Path:
        """The model and processor saved once (safetensors) for the loading and sentence-transformers benchmarks."""
        if "checkpoint" not in self.cache:
            path = self.workdir / "mmgem"
            self.bm.model.save_pretrained(path)
            self.bm.processor.save_pretrained(path)
            self.cache["checkpoint"] = path
        return self.cache["checkpoint"]

    def llava(self) -> Any:
        if "llava" not in self.cache:
            self.cache["llava"] = llava_on_shared_weights(self.bm)
        return self.cache["llava"]


def generation_kwargs(bm: BenchModel, new_tokens: int) -> dict[str, Any]:
    """Greedy decoding of exactly `new_tokens` tokens (random weights could emit EOS early), same for both sides."""
    text = bm.config.text_config
    return dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=text.pad_token_id,
        eos_token_id=text.eos_token_id,
    )


# ---------------------------------------------------------------------------------------------- embeddings
def image_embedding(ctx: SuiteContext) -> list[Record]:
    """`get_image_features` vs the stock tower's forward (pooled CLS) plus one linear layer, as CLIP does."""
    bm, model = ctx.bm, ctx.bm.model
    batch = bm.spec.image_batch
    pixels = pixel_values(bm, batch)
    head = clip_style_image_head(bm)
    tower = type(model.vision_model).__name__
    with torch.inference_mode():
        ours, base = ctx.ab(
            lambda: model.get_image_features(pixel_values=pixels).pooler_output,
            lambda: head(model.vision_model(pixel_values=pixels).pooler_output),
        )
    return [ctx.record("image_embedding", ours, f"{tower} + Linear", base, batch, target="<= 1.05")]


def text_embedding(ctx: SuiteContext) -> list[Record]:
    """`get_text_features` vs the stock LM backbone forward on the same (right-padded, `[EMB]`-ended) tokens."""
    bm, model = ctx.bm, ctx.bm.model
    batch = bm.spec.text_batch
    inputs = embedding_batch(bm, batch, bm.spec.text_length)
    backbone = model.language_model.model
    with torch.inference_mode():
        ours, base = ctx.ab(
            lambda: model.get_text_features(**inputs).pooler_output,
            lambda: backbone(**inputs, use_cache=False).last_hidden_state,
        )
    notes = f"{bm.spec.text_length} tokens max"
    return [
        ctx.record(
            "text_embedding", ours, f"{type(backbone).__name__} forward", base, batch, target="<= 1.05", notes=notes
        )
    ]


# ---------------------------------------------------------------------------------------------- captioning
def caption_decode(ctx: SuiteContext) -> list[Record]:
    """Decode time per token: MM-GEM `generate` vs the stock causal LM's `generate` from the same prefix length.

    Per-token decode time = (time for N new tokens - time for 1 new token) / (N - 1), taken per repetition, so the
    prefill (and MM-GEM's vision forward) cancels out.
    """
    bm, model = ctx.bm, ctx.bm.model
    batch, steps = bm.spec.caption_batch, bm.spec.decode_tokens
    pixels = pixel_values(bm, batch)
    prefix_len = caption_prefix(bm, batch).shape[1]
    prompt = random_tokens(bm, batch, prefix_len).to(bm.device)
    mask = torch.ones_like(prompt)
    lm = model.language_model
    one, many = generation_kwargs(bm, 1), generation_kwargs(bm, steps)
    fns = {
        "ours_1": lambda: model.generate(pixel_values=pixels, **one),
        "ours_n": lambda: model.generate(pixel_values=pixels, **many),
        "base_1": lambda: lm.generate(input_ids=prompt, attention_mask=mask, **one),
        "base_n": lambda: lm.generate(input_ids=prompt, attention_mask=mask, **many),
    }
    samples = interleaved(fns, bm.device, ctx.plan)
    per_token = {
        side: median([(n - o) / (steps - 1) for o, n in zip(samples[f"{side}_1"], samples[f"{side}_n"])])
        for side in ("ours", "base")
    }
    notes = f"prefix {prefix_len} tokens, {steps} new tokens"
    return [
        ctx.record(
            "caption_decode_per_token",
            per_token["ours"],
            f"{type(lm).__name__}.generate",
            per_token["base"],
            batch,
            target="<= 1.05",
            notes=notes,
        )
    ]


def caption_first_token(ctx: SuiteContext) -> list[Record]:
    """Time to first token of a caption: MM-GEM (k*k pooled visual tokens) vs LLaVA on the same tower and LM (all
    g*g patch tokens). Both include the vision forward and the prefill."""
    bm, model = ctx.bm, ctx.bm.model
    batch = bm.spec.caption_batch
    pixels = pixel_values(bm, batch)
    llava = ctx.llava()
    prompt = llava_prompt(bm, batch)
    mask = torch.ones_like(prompt)
    one = generation_kwargs(bm, 1)
    ours, base = ctx.ab(
        lambda: model.generate(pixel_values=pixels, **one),
        lambda: llava.generate(input_ids=prompt, attention_mask=mask, pixel_values=pixels, **one),
    )
    k, g = bm.config.num_image_tokens, bm.config.patch_grid_size**2
    notes = f"{k} vs {g} visual tokens per image"
    return [ctx.record("caption_first_token", ours, "LlavaForConditionalGeneration", base, batch, notes=notes)]


# ---------------------------------------------------------------------------------------------- training
def training_step(ctx: SuiteContext) -> list[Record]:
    """One joint step (forward + backward of contrastive + caption loss) vs an embedding-only step plus a
    caption-only step on the same batch. The optimiser update is left out: it does not depend on the loss."""
    bm, model = ctx.bm, ctx.bm.model
    batch = bm.spec.caption_batch
    data = training_batch(bm, batch, bm.spec.text_length, bm.spec.caption_length)
    embed_keys = ("pixel_values", "text_input_ids", "text_attention_mask")
    caption_keys = ("pixel_values", "input_ids", "attention_mask", "labels")

    def joint() -> None:
        model.zero_grad(set_to_none=True)
        model(**data).loss.backward()

    def separate() -> None:
        model.zero_grad(set_to_none=True)
        model(**{k: data[k] for k in embed_keys}).loss.backward()
        model.zero_grad(set_to_none=True)
        model(**{k: data[k] for k in caption_keys}).loss.backward()

    model.train()
    try:
        ours, base = ctx.ab(joint, separate)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return [
        ctx.record(
            "training_step",
            ours,
            "embedding step + caption step",
            base,
            batch,
            target="< 1",
            notes="forward + backward; one vision forward shared",
        )
    ]


# ---------------------------------------------------------------------------------------------- sentence-transformers
def sentence_transformer(ctx: SuiteContext) -> Any:
    """A SentenceTransformer over the saved folder whose inner model IS the benchmarked model (same weights)."""
    from sentence_transformers import SentenceTransformer

    bm = ctx.bm
    folder = ctx.saved_checkpoint()
    model_kwargs = {"dtype": bm.dtype}
    try:
        from mmgem.integrations.sentence_transformers import write_sentence_transformers_files
    except ImportError:  # the integration module is optional here: build the same pipeline from ST's own modules
        from sentence_transformers.base.modules import Normalize, Transformer

        module = Transformer(
            str(folder),
            modality_config={
                "text": {"method": "get_text_features", "method_output_name": "pooler_output"},
                "image": {"method": "get_image_features", "method_output_name": "pooler_output"},
            },
            module_output_name="sentence_embedding",
            model_kwargs={**model_kwargs, "trust_remote_code": True},
            processor_kwargs={"trust_remote_code": True},
            config_kwargs={"trust_remote_code": True},
        )
        st = SentenceTransformer(modules=[module, Normalize()], device=str(bm.device))
    else:
        write_sentence_transformers_files(folder)
        st = SentenceTransformer(str(folder), trust_remote_code=True, device=str(bm.device), model_kwargs=model_kwargs)
    st[0].model = bm.model  # swap in the benchmarked instance: both sides run the very same weights
    return st


def sentence_transformers_encode(ctx: SuiteContext) -> list[Record]:
    """`SentenceTransformer.encode` vs processor + `get_*_features` + L2 normalisation called directly."""
    bm, model, processor = ctx.bm, ctx.bm.model, ctx.bm.processor
    st = sentence_transformer(ctx)
    device = bm.device
    records = []

    texts = sentences(bm.spec.text_batch, words=max(2, bm.spec.text_length // 3))
    batch = len(texts)

    def direct_texts() -> torch.Tensor:
        inputs = processor(text=texts)
        with torch.inference_mode():
            out = model.get_text_features(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
            return F.normalize(out.pooler_output, dim=-1)

    ours, base = ctx.ab(
        lambda: st.encode(texts, batch_size=batch, convert_to_tensor=True, show_progress_bar=False),
        direct_texts,
    )
    records.append(ctx.record("st_encode_text", ours, "processor + get_text_features", base, batch, target="<= 1.1"))

    images = pil_images(bm, bm.spec.image_batch)
    batch = len(images)

    def direct_images() -> torch.Tensor:
        pixels = processor(images=images)["pixel_values"]
        with torch.inference_mode():
            out = model.get_image_features(pixels.to(device, bm.dtype))
            return F.normalize(out.pooler_output, dim=-1)

    ours, base = ctx.ab(
        lambda: st.encode(images, batch_size=batch, convert_to_tensor=True, show_progress_bar=False),
        direct_images,
    )
    records.append(ctx.record("st_encode_image", ours, "processor + get_image_features", base, batch, target="<= 1.1"))
    return records


# ---------------------------------------------------------------------------------------------- loading
def checkpoint_loading(ctx: SuiteContext) -> list[Record]:
    """Loading a saved checkpoint: `AutoModel.from_pretrained(trust_remote_code=True)` vs the stock causal LM plus the
    stock vision model loading the same weights, each in a fresh process (see benchmarks/loading.py for the RSS
    definition). Pairs of loads alternate their order; medians are reported."""
    bm = ctx.bm
    ours_dir = ctx.saved_checkpoint()
    base_dir = ctx.cache.get("stock") or save_baseline_checkpoints(bm.model, ctx.workdir / "stock")
    ctx.cache["stock"] = base_dir
    weights = safetensors_bytes(ours_dir)
    dtype = str(bm.dtype).removeprefix("torch.")
    types = (bm.config.text_config.model_type, bm.config.vision_config.model_type)
    runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
    sides = [("ours", ours_dir), ("baseline", base_dir)]
    for pair in range(1 if ctx.quick else 3):
        for side, path in sides if pair % 2 == 0 else sides[::-1]:
            runs[side].append(
                measure_in_subprocess(
                    side, path, types, str(bm.device), dtype, ctx.threads, ctx.workdir / "modules", ctx.plan.clock
                )
            )
    ours_s = median([r["seconds"] for r in runs["ours"]])
    base_s = median([r["seconds"] for r in runs["baseline"]])
    records = [ctx.record("load_time", ours_s, runs["baseline"][0]["classes"], base_s, 1, target="report")]
    ours_peak = [r["peak_rss_bytes"] for r in runs["ours"]]
    if all(p is not None for p in ours_peak) and weights:
        gb = 1e9
        base_peak = median([r["peak_rss_bytes"] for r in runs["baseline"]])
        notes = (
            f"peak RSS - RSS after imports ({runs['ours'][0]['peak_method']}); baseline peak "
            f"{base_peak / gb:.3g} GB = {base_peak / weights:.2f} x"
        )
        records.append(
            ctx.record(
                "load_peak_rss",
                median(ours_peak) / gb,
                "safetensors size",
                weights / gb,
                1,
                target="<= 1.3",
                unit="GB",
                notes=notes,
            )
        )
    return records
