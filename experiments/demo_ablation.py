"""What holds the demo back, measured: variants of `make demo`, each described by its change, on the validation split.

    python -m experiments.demo_ablation --output-dir demo-ablation            # every variant, two side by side
    python -m experiments.demo_ablation --output-dir demo-ablation --only caption_tokens_8x8

Each variant is the demo (`mmgem.demo.DemoConfig`), or an earlier demo (a Llama language model, and `previous_demo`
for the oldest), changed as its description says, trained on one torch thread per training process (two variants
share 2 cores), evaluated on the validation split every 500 steps. A variant whose `summary.json` exists under
`--output-dir` is reused. The final model of each is then diagnosed (`diagnose`): zero-shot errors by kind (colour
or shape), caption exact match by number of objects; in captions of several objects, how often the objects come in
the right order, each object's shape and size are right, the shapes are right as a set, and the caption starts with
the leftmost object, by that object's size; and where the language model looks when it names a shape (`binding`).
Writes `docs/demo/ablation.json` (variants not run this time keep their entry there), shown by
`python -m mmgem.results`. Nothing here reads the test split.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoProcessor

from mmgem.data.records import load_jsonl_records
from mmgem.demo import TARGETS, DemoConfig
from mmgem.embedding import caption, encode_images, encode_texts
from mmgem.evaluation.evaluate import templates_for
from mmgem.synthetic import SIZES, zero_shot_examples

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "demo" / "ablation.json"
# The demo's language model was a Llama before it normalised each head's queries and keys (Qwen3's layout): the
# variants measured then keep a Llama, and say so.
LLAMA_TEXT: dict[str, Any] = {"model_type": "llama"}
# The demo's vision tower learned at the language model's rate before it learned at twice that rate: the variants
# measured then keep that rate, and say so ("vision tower at 1x").
VISION_X1: dict[str, Any] = {"vision_learning_rate_multiplier": 1.0}
# Before that, the demo's learning rate decayed on a cosine to 0, not to half the peak: the variants measured then
# keep that schedule, and say so.
COSINE_TO_ZERO: dict[str, Any] = {**VISION_X1, "min_learning_rate_ratio": 0.0}
# The demo before its language model lost three layers and its stage 1 most of its steps; the variants after
# `previous_demo` change one thing of it.
PREVIOUS_DEMO: dict[str, Any] = {
    **COSINE_TO_ZERO,
    "architecture_overrides": {"text_config": {"num_hidden_layers": 4}},
    "stage1_steps": 250,
    "stage2_steps": 1000,
}
TWO_LAYER_LM: dict[str, Any] = {"text_config": {"num_hidden_layers": 2}}
# The demo trained in fp32 with the model's own attention (SDPA) before its two towers trained under bf16 autocast
# with eager attention: every variant after `last_weights_greedy` was measured then, and keeps that.
FP32: dict[str, Any] = {"tower_autocast_dtype": None, "attn_implementation": None}
# The demo kept the last weights of a 2,250-step stage 2 and decoded its captions greedily before its final model
# became the moving average of the weights of a 2,000-step stage 2 and its captions were decoded with 3 beams: every
# variant after `stage2_1800_steps` was measured then, and keeps that.
LAST_WEIGHTS_GREEDY: dict[str, Any] = {"ema_decay": None, "num_beams": 1, "stage2_steps": 2250}
# Two training processes (DDP), each with the demo's batch of 64: half the steps of the demo for the same images.
TWO_PROCESSES_BATCH_128: dict[str, Any] = {
    "processes": 2,
    "batch_size": 128,
    "stage1_steps": 13,
    "stage2_steps": 1125,
    "curve_every": 250,
}


def with_llama(config: dict[str, Any]) -> dict[str, Any]:
    """DemoConfig overrides `config` with a Llama language model (its other architecture overrides kept)."""
    architecture = config.get("architecture_overrides", {})
    text = {**architecture.get("text_config", {}), **LLAMA_TEXT}
    return {**config, "architecture_overrides": {**architecture, "text_config": text}}


def cosine_to_zero(**changes: Any) -> dict[str, Any]:
    """DemoConfig overrides: the vision tower at 1x, the learning rate decayed on a cosine to 0, with `changes`."""
    return {**COSINE_TO_ZERO, **changes}


def vision_x1(**changes: Any) -> dict[str, Any]:
    """DemoConfig overrides: the vision tower at the language model's learning rate, with `changes`."""
    return {**VISION_X1, **changes}


def language_learning_rate(factor: float) -> dict[str, Any]:
    """DemoConfig overrides: the vision tower at 1x, 25 + 2,250 steps, and in stage 2 every learning rate but the
    vision tower's `factor` times the demo's (the vision tower's stays as it was)."""
    return {
        **VISION_X1,
        "stage2_steps": 2250,
        "stage2_learning_rate": DemoConfig.stage2_learning_rate * factor,
        "stage2_train_overrides": {"vision_learning_rate_multiplier": 1.0 / factor},
    }


def previous_demo(architecture: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """DemoConfig overrides: the previous demo with `changes` (and `architecture` merged into its overrides)."""
    return {
        **PREVIOUS_DEMO,
        **changes,
        "architecture_overrides": {**PREVIOUS_DEMO["architecture_overrides"], **(architecture or {})},
    }


# Variants measured with a Llama language model: name -> (what changes, DemoConfig overrides besides the Llama).
LLAMA_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vision_learning_rate_x1": (
        "vision tower at 1x: at the same learning rate as the rest",
        vision_x1(),
    ),
    "vision_learning_rate_x3": (
        "the vision tower's learning rate 3x the rest's instead of 2x",
        {"vision_learning_rate_multiplier": 3.0},
    ),
    "vision_learning_rate_x4": (
        "the vision tower's learning rate 4x the rest's instead of 2x",
        {"vision_learning_rate_multiplier": 4.0},
    ),
    "stage2_2700_steps": (
        "vision tower at 1x, 25 + 2,700 steps instead of 2,250 (20% more time)",
        vision_x1(stage2_steps=2700),
    ),
    "vit_3_layers_2700_steps": (
        "vision tower at 1x, 3-layer ViT instead of 4, 25 + 2,700 steps",
        vision_x1(architecture_overrides={"vision_config": {"num_hidden_layers": 3}}, stage2_steps=2700),
    ),
    "language_model_8_heads": (
        "vision tower at 1x, language model with 8 attention heads of 16 dimensions instead of 4 of 32",
        vision_x1(architecture_overrides={"text_config": {"num_attention_heads": 8, "num_key_value_heads": 8}}),
    ),
    "cosine_to_zero": (
        "vision tower at 1x, learning rate on a cosine to 0, 25 + 2,250 steps",
        cosine_to_zero(stage2_steps=2250),
    ),
    "cosine_to_zero_1900_steps": (
        "vision tower at 1x, learning rate on a cosine to 0, 25 + 1,900 steps",
        cosine_to_zero(stage2_steps=1900),
    ),
    "constant_learning_rate": (
        "vision tower at 1x, learning rate constant after the warmup, 25 + 2,250 steps",
        vision_x1(
            stage2_steps=2250,
            train_overrides={"lr_scheduler_type": "constant_with_warmup", "lr_scheduler_kwargs": {}},
        ),
    ),
    "language_learning_rate_x0.5": (
        "vision tower at 1x; in stage 2, the learning rate of all but the vision tower x0.5",
        language_learning_rate(0.5),
    ),
    "language_learning_rate_x1.5": (
        "vision tower at 1x; in stage 2, the learning rate of all but the vision tower x1.5",
        language_learning_rate(1.5),
    ),
    "language_learning_rate_x2": (
        "vision tower at 1x; in stage 2, the learning rate of all but the vision tower x2",
        language_learning_rate(2.0),
    ),
    "language_model_2_layers": (
        "vision tower at 1x, 2-layer language model, 25 + 1,650 steps",
        vision_x1(architecture_overrides=TWO_LAYER_LM, stage2_steps=1650),
    ),
    "language_model_2_layers_batch_48": (
        "vision tower at 1x, 2-layer language model, batch 48 for 25 + 2,200 steps",
        vision_x1(architecture_overrides=TWO_LAYER_LM, batch_size=48, stage2_steps=2200),
    ),
    "caption_tokens_8x8_1900_steps": (
        "vision tower at 1x, 64 caption tokens (the 8x8 grid, not pooled) instead of 16, 25 + 1,900 steps",
        vision_x1(architecture_overrides={"pool_grid_size": 8}, stage2_steps=1900),
    ),
    "batch_48_cosine_to_zero": (
        "vision tower at 1x, learning rate on a cosine to 0, batch 48 for 25 + 2,500 steps",
        cosine_to_zero(batch_size=48, stage2_steps=2500),
    ),
    "one_region_per_image_cosine_to_zero": (
        "vision tower at 1x, learning rate on a cosine to 0, 25 + 2,250 steps, one region per image in stage 2 "
        "instead of up to 4",
        cosine_to_zero(max_regions_per_image=1, stage2_steps=2250),
    ),
    "language_model_2_layers_cosine_to_zero": (
        "vision tower at 1x, learning rate on a cosine to 0, 2-layer language model, 25 + 1,650 steps",
        cosine_to_zero(architecture_overrides=TWO_LAYER_LM, stage2_steps=1650),
    ),
    "language_model_2_layers_batch_48_cosine_to_zero": (
        "vision tower at 1x, learning rate on a cosine to 0, 2-layer language model, batch 48 for 25 + 2,200 steps",
        cosine_to_zero(architecture_overrides=TWO_LAYER_LM, batch_size=48, stage2_steps=2200),
    ),
    "vit_6_layers_cosine_to_zero": (
        "vision tower at 1x, learning rate on a cosine to 0, 2-layer language model, 6-layer ViT, 25 + 1,150 steps",
        cosine_to_zero(
            architecture_overrides={**TWO_LAYER_LM, "vision_config": {"num_hidden_layers": 6}}, stage2_steps=1150
        ),
    ),
    "previous_demo": (
        "vision tower at 1x, learning rate on a cosine to 0, 4-layer language model, 250 + 1,000 steps "
        "(an earlier demo)",
        previous_demo(),
    ),
    "learning_rate_x2": (
        "previous demo, learning rates x2 (2e-3, then 1e-3)",
        previous_demo(stage1_learning_rate=2e-3, stage2_learning_rate=1e-3),
    ),
    "temperature_0.02": (
        "previous demo, temperature initialised at 0.02 instead of 0.07",
        previous_demo({"logit_scale_init_value": 3.912}),
    ),
    "caption_tokens_8x8": (
        "previous demo, 64 caption tokens (the 8x8 grid, not pooled) instead of 16",
        previous_demo({"pool_grid_size": 8}),
    ),
    "caption_loss_x2": ("previous demo, caption loss weight 2", previous_demo({"caption_loss_weight": 2.0})),
    "hard_negatives": (
        "previous demo, batches of blocks of 8 scenes sharing their colours",
        previous_demo(hard_negative_group_size=8),
    ),
    "stage1_longer": ("previous demo, 1,000 + 500 steps", previous_demo(stage1_steps=1000, stage2_steps=500)),
    "stage1_short": ("previous demo, 25 + 1,150 steps", previous_demo(stage1_steps=25, stage2_steps=1150)),
    "batch_32": (
        "previous demo, batch 32 for twice the steps (500 + 2,000)",
        previous_demo(batch_size=32, stage1_steps=500, stage2_steps=2000, curve_every=1000),
    ),
}
MEASURED_IN_FP32: dict[str, tuple[str, dict[str, Any]]] = {
    "fp32": (
        "the demo in fp32 with SDPA attention (the demo before its towers trained under bf16 autocast)",
        {},
    ),
    "llama_language_model": ("Llama language model: queries and keys not normalised (the demo before)", with_llama({})),
    "llama_attention_logits_x4": (
        "Llama language model with its attention logits scaled 4x (Granite's attention_multiplier 4/sqrt(32))",
        {"architecture_overrides": {"text_config": {"model_type": "granite", "attention_multiplier": 0.7071}}},
    ),
    "llama_min_horizontal_gap_8": (
        "Llama language model; in the data, objects' box centres at least 8 px apart horizontally (one patch)",
        with_llama({"min_horizontal_gap": 8}),
    ),
    "vision_tower_gelu": (
        "the vision tower's MLP on exact GELU instead of CLIP's quick GELU (a step in 0.95x the time; on 2 threads)",
        {"architecture_overrides": {"vision_config": {"hidden_act": "gelu"}}, "threads": 2},
    ),
    "two_processes_batch_128": (
        "2 training processes of 1 thread (DDP), batch 128 for 13 + 1,125 steps: the same images, in 0.77x the time",
        {**TWO_PROCESSES_BATCH_128},
    ),
    "two_processes_batch_128_learning_rate_x1.4": (
        "2 training processes of 1 thread (DDP), batch 128 for 13 + 1,125 steps, stage 2 learning rate 7e-4",
        {**TWO_PROCESSES_BATCH_128, "stage2_learning_rate": 7e-4},
    ),
    **{
        name: (f"Llama language model, {change}", with_llama(config))
        for name, (change, config) in LLAMA_VARIANTS.items()
    },
}
# name -> (what changes, DemoConfig overrides). The first is the demo as it is. The table shows each one's training
# CPU time: compare variants that took about the same.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": (
        "nothing: 1-layer language model with queries and keys normalised per head (Qwen3), 25 + 2,000 steps of "
        "batch 64, learning rate on a cosine to half its peak, the vision tower's at twice the rest's, both towers "
        "under bf16 autocast with eager attention, stage 2's final model the moving average of its weights (decay "
        "0.99), captions decoded with 3 beams",
        {},
    ),
    "stage2_2250_steps": ("25 + 2,250 steps instead of 2,000 (1.12x the training time)", {"stage2_steps": 2250}),
    "stage2_1800_steps": ("25 + 1,800 steps instead of 2,000 (0.9x the training time)", {"stage2_steps": 1800}),
    "last_weights_greedy": (
        "stage 2's last weights instead of their moving average, captions decoded greedily, 25 + 2,250 steps (the "
        "demo before)",
        LAST_WEIGHTS_GREEDY,
    ),
    **{
        name: (change, {**FP32, **LAST_WEIGHTS_GREEDY, **config}) for name, (change, config) in MEASURED_IN_FP32.items()
    },
}
EVAL_EVERY = 500


def variant_config(name: str, seed: int = 0) -> dict[str, Any]:
    """The DemoConfig arguments of a variant: one torch thread per training process, the validation split, the curve
    every 500 steps (unless the variant says otherwise)."""
    changes = VARIANTS[name][1]
    threads = changes.get("processes", DemoConfig.processes)
    return {"eval_split": "val", "threads": threads, "curve_every": EVAL_EVERY, "seed": seed, **changes}


def run_variant(name: str, output_dir: Path, seed: int = 0) -> Path:
    """Train and evaluate one variant in a child process (one torch thread); returns its folder."""
    folder = output_dir / name
    if not (folder / "summary.json").is_file():
        config = variant_config(name, seed)
        code = (
            "import json, sys; from mmgem.demo import DemoConfig, run_demo; "
            "run_demo(sys.argv[1], DemoConfig(**json.loads(sys.argv[2])), progress=False)"
        )
        log = output_dir / f"{name}.log"
        with log.open("w") as stream:
            done = subprocess.run(
                [sys.executable, "-c", code, str(folder), json.dumps(config)], stdout=stream, stderr=stream
            )
        if done.returncode:
            raise RuntimeError(f"Variant {name!r} failed (exit {done.returncode}); see {log}.")
    return folder


def _phrases(caption: str) -> list[str]:
    """'a small red circle, a large blue star and ...' -> ['a small red circle', 'a large blue star', ...]."""
    return [part.strip() for part in re.split(r",| and ", caption) if part.strip()]


def _match_by_colour(reference: Sequence[str], produced: Sequence[str]) -> list[str | None]:
    """For each reference phrase, the produced phrase of the same colour and the same rank among that colour's
    phrases (the 2nd red object to the 2nd red phrase; objects may share a colour), or None."""
    by_colour: dict[str, list[str]] = collections.defaultdict(list)
    for phrase in produced:
        by_colour[" ".join(phrase.split()[2:3])].append(phrase)
    seen: collections.Counter = collections.Counter()
    matches = []
    for phrase in reference:
        colour = " ".join(phrase.split()[2:3])
        candidates = by_colour[colour]
        matches.append(candidates[seen[colour]] if seen[colour] < len(candidates) else None)
        seen[colour] += 1
    return matches


def _cells_of_box(box: Sequence[float], image_side: float, grid: int) -> torch.Tensor:
    """Which cells of the `grid` x `grid` token grid (row-major, [grid * grid] bools) the box covers by a quarter."""
    cell = image_side / grid
    edges = torch.arange(grid + 1, dtype=torch.float32) * cell
    x0, y0, x1, y1 = (float(v) for v in box)
    overlap_x = (torch.minimum(edges[1:], torch.tensor(x1)) - torch.maximum(edges[:-1], torch.tensor(x0))).clamp(min=0)
    overlap_y = (torch.minimum(edges[1:], torch.tensor(y1)) - torch.maximum(edges[:-1], torch.tensor(y0))).clamp(min=0)
    return (overlap_y[:, None] * overlap_x[None, :] >= cell * cell / 4).flatten()  # [grid * grid]


@torch.no_grad()
def binding(model: Any, processor: Any, records: Sequence[Any]) -> dict[str, Any]:
    """Does the caption decoder look at the object it describes? Over the two-object images whose objects differ
    in colour, captions given word by word (teacher forcing): at the token of each object's colour, from which the
    model names its shape, the attention (mean over heads) on the visual tokens of that object and on those of the
    other object (tokens covered by both left out), in the layer where the difference is largest, and how often
    the shape named there is right. Objects whose colour is not one token are left out; with none left, the
    fractions are None."""
    unmeasured = dict.fromkeys(
        ("shape_right_given_previous_words", "attention_on_object", "attention_on_other_object", "layer")
    )
    unmeasured["objects"] = 0
    pairs = [r for r in records if len(r.regions) == 2 and len({_colour(g.caption) for g in r.regions}) == 2]
    if not pairs:
        return unmeasured
    images = [r.load_image() for r in pairs]
    inputs = processor(images=images, text=[r.caption for r in pairs])
    output = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        output_attentions=True,
    )
    attentions = torch.stack([a.float().mean(1) for a in output.attentions])  # [layers, B, L, L], heads averaged
    grid, side = math.isqrt(model.config.num_image_tokens), inputs["pixel_values"].shape[-1]
    tokenizer = processor.tokenizer
    on_object, on_other, shape_right = [], [], []
    for row, record in enumerate(pairs):
        ids = inputs["input_ids"][row]
        visual = (ids == processor.image_token_id).nonzero().flatten()  # [grid * grid], row-major
        words = [tokenizer.decode([i]).strip() for i in ids.tolist()]
        scale = side / images[row].width
        cells = [_cells_of_box([v * scale for v in region.box], side, grid) for region in record.regions]
        for index, region in enumerate(record.regions):
            colour, shape = _colour(region.caption), region.caption.split()[3]
            at = [t for t, word in enumerate(words) if word == colour and t > visual[-1]]
            if len(at) != 1:
                continue
            mine, other = cells[index] & ~cells[1 - index], cells[1 - index] & ~cells[index]
            weights = attentions[:, row, at[0]][:, visual]  # [layers, grid * grid]
            on_object.append(weights[:, mine].sum(-1))
            on_other.append(weights[:, other].sum(-1))
            shape_right.append(tokenizer.decode([int(output.logits[row, at[0]].argmax())]).strip() == shape)
    if not shape_right:
        return unmeasured
    on_object_mean, on_other_mean = torch.stack(on_object).mean(0), torch.stack(on_other).mean(0)  # [layers]
    layer = int((on_object_mean - on_other_mean).argmax())
    return {
        "objects": len(shape_right),
        "shape_right_given_previous_words": sum(shape_right) / len(shape_right),
        "attention_on_object": float(on_object_mean[layer]),
        "attention_on_other_object": float(on_other_mean[layer]),
        "layer": layer,
    }


def _colour(phrase: str) -> str:
    """'a small red circle' -> 'red'."""
    return phrase.split()[2]


@torch.no_grad()
def diagnose(model_dir: Path, data_dir: Path, max_new_tokens: int = 32) -> dict[str, Any]:
    """Where the model's errors are, on the validation split of the synthetic shapes."""
    # Eager attention: the binding diagnosis reads the attention weights.
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    records = load_jsonl_records(data_dir / "val.jsonl")
    labels = json.loads((data_dir / "labels.json").read_text())
    classes = labels["classes"]
    templates, _ = templates_for(labels)  # the prompts `mmgem evaluate` scores zero-shot with (reduction: max)
    examples = zero_shot_examples(records)
    prompts = [template.format(name) for name in classes for template in templates]
    text_embeds = encode_texts(model, processor, prompts)  # [C * T, D]
    image_embeds = encode_images(model, processor, [record.load_image() for record, _ in examples])  # [N, D]
    scores = (image_embeds @ text_embeds.T).view(len(examples), len(classes), len(templates)).amax(-1)  # [N, C]
    zero_shot = collections.Counter()
    for (_, label), predicted in zip(examples, scores.argmax(-1).tolist()):
        colour, shape = label.split()
        got_colour, got_shape = classes[predicted].split()
        zero_shot["colour wrong"] += colour != got_colour
        zero_shot["shape wrong"] += shape != got_shape
    zero_shot["images"] = len(examples)

    generated = caption(model, processor, [record.load_image() for record in records], max_new_tokens=max_new_tokens)
    by_count: dict[int, list[bool]] = collections.defaultdict(list)
    multi = collections.Counter()
    for record, text in zip(records, generated):
        reference, produced = _phrases(record.caption), _phrases(text)
        by_count[len(reference)].append(text == record.caption)
        if len(reference) < 2:
            continue
        multi["captions"] += 1
        # Does the caption start with the leftmost object, whatever its size? (records list objects left to right)
        leftmost = (record.metadata.get("objects") or [{}])[0].get("size")
        multi[f"leftmost {leftmost}"] += 1
        multi[f"leftmost {leftmost} named first"] += bool(produced) and produced[0] == reference[0]
        if leftmost == "small" and produced and produced[0] != reference[0]:
            # Started with another object of the scene instead: a large one, or another small one?
            others = {p: p.split()[1] for p in reference[1:]}
            multi[f"started with a {others.get(produced[0], 'missing')} object"] += 1
        multi["colour order right"] += [p.split()[2:3] for p in produced] == [p.split()[2:3] for p in reference]
        multi["shapes right as a set"] += sorted(p.split()[3:4] for p in produced) == sorted(
            p.split()[3:4] for p in reference
        )
        for phrase, match in zip(reference, _match_by_colour(reference, produced)):
            multi["objects"] += 1
            multi["shape right"] += match is not None and match.split()[3:4] == phrase.split()[3:4]
            multi["size right"] += match is not None and match.split()[1:2] == phrase.split()[1:2]
    return {
        "zero_shot": dict(zero_shot),
        "caption_exact_match_by_objects": {str(n): sum(v) / len(v) for n, v in sorted(by_count.items())},
        "multi_object_captions": {
            "colour_order_right": multi["colour order right"] / max(multi["captions"], 1),
            "shapes_right_as_a_set": multi["shapes right as a set"] / max(multi["captions"], 1),
            "shape_right": multi["shape right"] / max(multi["objects"], 1),
            "size_right": multi["size right"] / max(multi["objects"], 1),
        },
        # Captions of several objects that start with the right phrase, by the size of the leftmost object.
        "first_object_right_by_leftmost_size": {
            size: multi[f"leftmost {size} named first"] / multi[f"leftmost {size}"]
            for size in SIZES
            if multi[f"leftmost {size}"]
        },
        # Of the captions that should start with a small object and start with another object of the scene, the
        # share that start with a large one.
        "large_object_first_when_leftmost_small": multi["started with a large object"]
        / max(multi["started with a large object"] + multi["started with a small object"], 1),
        "binding": binding(model, processor, records),
    }


def variant_result(name: str, folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "summary.json").read_text())
    curve = json.loads((folder / "curve.json").read_text()) if (folder / "curve.json").is_file() else []
    return {
        "name": name,
        "change": VARIANTS[name][0],
        "config": asdict(DemoConfig(**variant_config(name))),
        "metrics": {key: summary["metrics"].get(key) for key in (*TARGETS, "region_caption/exact_match")},
        "curve": curve,
        "training_cpu_s": summary["timings"]["training_cpu_s"],
        "diagnosis": diagnose(folder / "stage2", folder / "data"),
    }


def recorded_variants(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of an earlier results file for the variants still defined, by name (none without the file): the
    variants not run again keep them."""
    if not path.is_file():
        return {}
    return {entry["name"]: entry for entry in json.loads(path.read_text())["variants"] if entry["name"] in VARIANTS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo_ablation", description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True, help="one folder per variant (reused when finished)")
    parser.add_argument("--only", help=f"comma-separated variants (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained side by side (default 2)")
    parser.add_argument("--results", default=str(OUTPUT), help=f"where the JSON goes (default {OUTPUT})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or args.jobs < 1:
        raise SystemExit(
            f"error: --only takes {', '.join(VARIANTS)}; got {unknown}" if unknown else "error: --jobs >= 1"
        )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        folders = list(
            tqdm(pool.map(lambda name: run_variant(name, output_dir), names), total=len(names), desc="variants")
        )
    torch.set_num_threads(2)
    measured = {name: variant_result(name, folder) for name, folder in zip(names, folders)}
    path = Path(args.results)
    kept = recorded_variants(path)
    results = [measured.get(name) or kept[name] for name in VARIANTS if name in measured or name in kept]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"eval_split": "val", "default": asdict(DemoConfig()), "variants": results}, indent=1) + "\n"
    )
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
