"""What the experiments run: budgets (full, quick, micro), the model architecture, the data variants and the arms.

Every arm of a budget shares the data, the training options and the evaluation code; arms differ only in the one
thing they test (loss weights, pool grid, stage-2 data, text encoder). Nothing here was chosen on the test split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mmgem.presets import architecture
from mmgem.synthetic import PREAMBLE_MIN_WORDS

# Long-caption variants. "strict": the dataset default, whose generic opening is longer than CLIP's 77 tokens, so a
# 77-token text encoder sees no detail at all (the paper's premise pushed to its extreme). "mild": a shorter
# opening, so the details start around token 50-60 and CLIP sees the object count and part of the first object.
LONG_VARIANTS: dict[str, int] = {"strict": PREAMBLE_MIN_WORDS, "mild": 40}
CLIP_CONTEXT = 77
EXPERIMENT_CONTEXT = 512  # LLM positions of the experiments' models


def experiment_architecture(preset: str = "demo", vocab_size: int | None = None) -> dict[str, Any]:
    """The MM-GEM architecture of the experiments, from the preset registry (`mmgem.presets`).

    The demo preset (4-layer ViT on 64 px images with an 8x8 patch grid, 1-layer Llama) needs about ten minutes of
    two CPU cores to train once; the experiments train ~40 models in 45 minutes, so `preset="demo"` gives the
    `experiments` preset: the demo's widths, image size and patch grid (the pool-grid arms need the 8x8 grid) with 2
    layers per tower and a 512-position LLM context (RoPE: no extra weights) so that long descriptions fit. Other
    presets ("tiny" for the tests) get the 512-position context only.
    """
    overrides: dict[str, Any] = {"text_config": {"max_position_embeddings": EXPERIMENT_CONTEXT}}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return architecture("experiments" if preset == "demo" else preset, **overrides)


@dataclass(frozen=True)
class Budget:
    """Data sizes, training steps, seeds and evaluation sizes of one experiments run."""

    name: str
    preset: str
    seeds: tuple[int, ...]
    num_train: int
    num_val: int
    num_test: int
    image_size: int
    steps: int  # stage-1 steps (short captions) of every arm, from scratch
    extra_steps: int  # steps of stage 2, and of the stage-1 continuation it is compared with
    long_steps: int  # fine-tuning steps on long descriptions (MM-GEM and CLIP, from their stage-1 models)
    batch_size: int
    long_batch_size: int
    learning_rate: float = 1e-3
    extra_learning_rate: float = 5e-4
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_regions_per_image: int = 4
    max_objects: int = 4
    vocab_size: int = 1000  # one BPE tokenizer per run, trained on every training text (captions, long, regions)
    max_new_tokens: int = 32
    eval_batch_size: int = 64
    data_seed: int = 0
    target_minutes: float = 45.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


BUDGETS: dict[str, Budget] = {
    "full": Budget(
        name="full",
        preset="demo",
        seeds=(0, 1, 2),
        num_train=2000,
        num_val=100,
        num_test=200,
        image_size=64,
        steps=200,
        extra_steps=100,
        long_steps=150,
        batch_size=64,
        long_batch_size=32,
        target_minutes=45.0,
        note="`make experiments`: three seeds of every arm.",
    ),
    "quick": Budget(
        name="quick",
        preset="demo",
        seeds=(0,),
        num_train=1000,
        num_val=50,
        num_test=100,
        image_size=64,
        steps=100,
        extra_steps=50,
        long_steps=75,
        batch_size=64,
        long_batch_size=32,
        target_minutes=10.0,
        note="`--quick`: one seed, half the steps; a smoke run of the whole pipeline, too short for conclusions.",
    ),
    "micro": Budget(
        name="micro",
        preset="tiny",
        seeds=(0,),
        num_train=24,
        num_val=8,
        num_test=12,
        image_size=32,
        steps=2,
        extra_steps=2,
        long_steps=2,
        batch_size=8,
        long_batch_size=8,
        vocab_size=400,
        max_new_tokens=4,
        target_minutes=1.0,
        note="`--budget micro`: the test suite's check of the harness; the numbers mean nothing.",
    ),
}


# ---------------------------------------------------------------------------------------------------------- arms
@dataclass(frozen=True)
class Arm:
    """One configuration that is trained and evaluated once per seed."""

    name: str
    claim: str  # "objectives", "pool", "stages" or "long"
    label: str  # shown in tables and plots
    description: str


def pool_grids(spec: dict[str, Any]) -> list[int]:
    """The pool grids compared: 1x1, 2x2, 4x4 and the full patch grid (those the patch grid allows)."""
    full = spec["vision_config"]["image_size"] // spec["vision_config"]["patch_size"]
    return sorted({k for k in (1, 2, 4) if k <= full} | {full})


def default_grid(spec: dict[str, Any]) -> int:
    return int(spec.get("pool_grid_size", 4))


def arms_for(spec: dict[str, Any]) -> list[Arm]:
    """Every arm of the experiments, in report order."""
    full = pool_grids(spec)[-1]
    arms = [
        Arm("joint", "objectives", "joint (MM-GEM)", "contrastive + caption loss, weights 1 and 1"),
        Arm("embedding_only", "objectives", "embedding only", "caption loss weight 0"),
        Arm("caption_only", "objectives", "caption only", "contrastive loss weight 0"),
    ]
    for k in pool_grids(spec):
        kind = "full grid" if k == full else f"{k}x{k}"
        same = " (the joint arm)" if k == default_grid(spec) else ""
        arms.append(Arm(f"pool_{k}", "pool", f"{k}x{k} = {k * k} tokens", f"pool grid {kind}{same}"))
    arms += [
        Arm("stage1", "stages", "stage 1", "the joint arm after stage 1"),
        Arm("stage1_more", "stages", "stage 1 + more stage 1", "stage 1 continued on image-caption pairs"),
        Arm("stage2", "stages", "stage 1 + stage 2", "stage 1 continued on image-caption pairs and regions"),
    ]
    for variant in LONG_VARIANTS:
        for model, name in (("clip", "CLIP, 77 tokens"), ("mmgem77", "MM-GEM cut to 77 tokens"), ("mmgem", "MM-GEM")):
            arms.append(
                Arm(
                    f"long_{variant}_{model}_zs",
                    "long_zero_shot",
                    f"{name} ({variant}, stage 1 only)",
                    "the stage-1 model, no long descriptions seen",
                )
            )
        for model, name in (("clip", "CLIP, 77 tokens"), ("mmgem77", "MM-GEM cut to 77 tokens"), ("mmgem", "MM-GEM")):
            arms.append(
                Arm(
                    f"long_{variant}_{model}",
                    "long",
                    f"{name} ({variant})",
                    "the stage-1 model fine-tuned on the long descriptions",
                )
            )
    return arms


@dataclass(frozen=True)
class Task:
    """A unit of work for one seed.

    - "core": the joint model (stage 1), its two continuations (claim 3) and its long-description fine-tunes
      (claim 4), all from the same stage-1 model;
    - "single": one stage-1 model with other loss weights or another pool grid (claims 1 and 2);
    - "clip": the CLIP baseline: stage 1 on short captions with the same budget, then its long fine-tunes.
    """

    kind: str
    arm: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0  # relative cost, to start long tasks first

    @property
    def key(self) -> str:
        return f"{self.arm}/seed{self.seed}"


def tasks_for(budget: Budget, spec: dict[str, Any]) -> list[Task]:
    """The tasks of a budget, most expensive first (better packing when tasks run in parallel)."""
    grid = default_grid(spec)
    unit = budget.steps * budget.batch_size
    long_share = budget.long_steps * budget.long_batch_size / max(unit, 1)
    tasks = []
    for seed in budget.seeds:
        core = 1.0 + 2.5 * budget.extra_steps / max(budget.steps, 1) + 8 * long_share
        tasks.append(Task("core", "joint", seed, cost=core))
        tasks.append(Task("single", "embedding_only", seed, {"caption_loss_weight": 0.0}))
        tasks.append(Task("single", "caption_only", seed, {"contrastive_loss_weight": 0.0}))
        for k in pool_grids(spec):
            if k != grid:
                tasks.append(Task("single", f"pool_{k}", seed, {"pool_grid_size": k}, cost=1.0 + k * k / 64))
        tasks.append(Task("clip", "clip", seed, cost=0.4 + long_share))
    return sorted(tasks, key=lambda t: -t.cost)
