"""The end-to-end demo (`make demo`): MM-GEM trained from scratch on 2 CPU cores, evaluated and exported.

    python -m mmgem.demo --output-dir demo-output

1. generates the synthetic shapes dataset (`mmgem.synthetic`) into `OUT/data`;
2. builds a small MM-GEM from scratch (a 4-layer ViT on 64 px images, a 1-layer Qwen3-style language model, a BPE
   tokenizer trained on the training captions) and trains stage 1 (image-caption pairs) then stage 2 (regions too)
   with the HF Trainer (`mmgem.training.train`), into `OUT/stage1` and `OUT/stage2`;
3. evaluates on the held-out test split (`mmgem.evaluation.evaluate`): `OUT/metrics.json`, same keys as
   `mmgem evaluate`;
4. exports a Hub-ready folder with a model card to `OUT/model` through the conversion code, then reloads it with
   `AutoModel` and `SentenceTransformer` and checks that they give the trained model's embeddings;
5. prints the results table against the targets, example captions and region captions, and saves
   `OUT/loss_curves.png` and `OUT/retrieval_grid.png` (with `--curve-every N` also `OUT/curve.json` and
   `OUT/target_curves.png`: the targets' metrics every N steps). `OUT/summary.json` records settings, timings and
   targets.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoProcessor, TrainerCallback

from mmgem.cli import command_parser
from mmgem.conversion.convert_mmgem import export_checkpoint
from mmgem.data.records import load_jsonl_records
from mmgem.embedding import encode_images, encode_texts
from mmgem.errors import checking_user_input
from mmgem.evaluation.evaluate import (
    evaluate_model,
    format_table,
    templates_for,
    write_metrics,
)
from mmgem.loading import load_model
from mmgem.presets import architecture
from mmgem.synthetic import ensure_dataset
from mmgem.training.distributed import has_accelerator
from mmgem.training.precision import check_attention, check_autocast_dtype, cpu_has_native_bf16
from mmgem.training.train import train

# Targets of the demo on the held-out split (metric key, minimum).
TARGETS: dict[str, float] = {
    "text_to_image/R@1": 0.8,
    "image_to_text/R@1": 0.8,
    "zero_shot/accuracy": 0.9,
    "region_retrieval/R@1": 0.8,
    "caption/exact_match": 0.5,
}
WALL_TIME_TARGET_S = 600.0  # the whole demo, on 2 CPU cores, once the virtual environment exists


@dataclass
class DemoConfig:
    """Everything the demo's result depends on (recorded in `summary.json`)."""

    num_train: int = 12000
    num_val: int = 200
    num_test: int = 300
    image_size: int = 64
    max_objects: int = 3
    single_object_fraction: float = 0.3
    size_fractions: dict[str, list[float]] | None = None  # None: mmgem.synthetic.SIZE_FRACTIONS
    num_heldout_pairs: int = 0
    min_horizontal_gap: int = 0
    data_seed: int = 0
    preset: str = "demo"
    architecture_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the preset (sub-dicts too)
    threads: int = 2  # CPU threads in all: each training process gets threads // processes
    # Training processes: one model, gloo DDP on the CPU (ignored where torch sees an accelerator). On 2 cores, two
    # processes of one thread each train as fast as one of two threads at the same batch, and 1.2-1.3x as many
    # images a second at twice the batch (`benchmarks/demo_speed.py --compare processes`); but the captions need the
    # steps: in fp32, without the weight average, 25 + 2,250 steps of 64 images reached caption exact match 0.55 on
    # validation, 13 + 1,125 steps of 128 images 0.485, in 0.77x the time (`experiments/demo_ablation.py`: `fp32`,
    # `two_processes_batch_128`).
    processes: int = 1
    batch_size: int = 64  # in all processes together: each takes batch_size // processes per step
    stage2_batch_size: int | None = None  # default: batch_size
    # A short stage 1: stage 2 trains captions too, and every step moved to it helps the region and embedding targets
    # (`experiments/demo_ablation.py`: `stage1_longer`, `stage1_short`).
    stage1_steps: int = 25
    # With the weight average (`ema_decay`), 2,000 steps reach zero-shot accuracy 0.95 and caption exact match 0.61 on
    # validation, no less than 2,250 do; 1,800 miss zero-shot (`experiments/demo_ablation.py`: `demo`,
    # `stage2_2250_steps`, `stage2_1800_steps`).
    stage2_steps: int = 2000
    stage1_learning_rate: float = 1e-3
    stage2_learning_rate: float = 5e-4
    # The vision tower learns from scratch at twice the language model's rate: it must learn the shapes and where each
    # object lies before the language model can name them in order (`experiments/demo_ablation.py`:
    # `vision_learning_rate_x1`, `vision_learning_rate_x3`).
    vision_learning_rate_multiplier: float = 2.0
    # Both towers train under autocast in this dtype, with eager attention (PyTorch's CPU flash-attention kernel is
    # slower in bf16 than in fp32): on a CPU with AVX-512 BF16, stage 2 runs 1.44x as fast as in fp32, and 1.12x as
    # fast as with the whole model in bf16 (`benchmarks/demo_speed.py`). Caption exact match on validation: 0.50
    # against 0.55 in fp32 on one thread (`experiments/demo_ablation.py`: `demo`, `fp32`), 0.535 on two. "auto":
    # bfloat16 where the hardware computes it natively (an accelerator, or a CPU with AVX-512 BF16 / AMX), else None.
    tower_autocast_dtype: str | None = "auto"
    attn_implementation: str | None = "eager"
    # Stage 2's final model is the moving average of its weights over about its last 100 steps (decay 0.99): on
    # validation, one run's average reached caption exact match 0.63 and zero-shot 0.98 where its last weights reached
    # 0.535 and 0.90 (`mmgem.training.averaging`). Stage 1 is too short to average.
    ema_decay: float | None = 0.99
    hard_negative_group_size: int | None = None  # batches of blocks of this many scenes sharing colours; None: off
    warmup_steps: float = 0.1
    # Each stage's learning rate decays on a cosine to this fraction of its peak. Kept up, it lets the language model
    # learn to look at the object it names, which whole-image captions need (`experiments/demo_ablation.py`:
    # `cosine_to_zero`, `constant_learning_rate`).
    min_learning_rate_ratio: float = 0.5
    weight_decay: float = 0.01
    max_regions_per_image: int | None = 4
    seed: int = 0
    max_new_tokens: int = 32
    # Captions are decoded by beam search: on validation, 3 beams gave caption exact match 0.595 and 0.61 where greedy
    # decoding gave 0.54 and 0.535 (two trainings of the demo, `mmgem.evaluation.evaluate_model(num_beams=...)`), for
    # about a second more of evaluation; 5 beams gave no more.
    num_beams: int = 3
    eval_batch_size: int = 64
    eval_split: str = "test"  # "val" while choosing settings; the reported numbers are on "test"
    curve_every: int | None = None  # also evaluate every N steps of each stage: curve.json and target_curves.png
    train_overrides: dict[str, Any] = field(default_factory=dict)  # `mmgem.training.train` arguments, both stages
    stage2_train_overrides: dict[str, Any] = field(default_factory=dict)  # stage 2 only, applied after the above


QUICK = dict(
    num_train=24,
    num_val=8,
    num_test=12,
    image_size=32,
    preset="tiny",
    batch_size=8,
    stage1_steps=2,
    stage2_steps=2,
    max_new_tokens=6,
    threads=1,
)


# ---------------------------------------------------------------------------------------------------------- steps
def prepare_data(config: DemoConfig, folder: Path) -> dict[str, Path]:
    """Generate the dataset, or reuse `folder` when it was generated with the same settings."""
    return ensure_dataset(
        folder,
        num_train=config.num_train,
        num_val=config.num_val,
        num_test=config.num_test,
        image_size=config.image_size,
        seed=config.data_seed,
        max_objects=config.max_objects,
        num_heldout_pairs=config.num_heldout_pairs,
        single_object_fraction=config.single_object_fraction,
        size_fractions=config.size_fractions,
        min_horizontal_gap=config.min_horizontal_gap,
    )


def training_processes(config: DemoConfig) -> int:
    """How many processes train: `config.processes` on the CPU, one where torch sees an accelerator."""
    return 1 if has_accelerator() else config.processes


def resolved_autocast_dtype(config: DemoConfig) -> str | None:
    """`config.tower_autocast_dtype`, with "auto" resolved for this machine."""
    if config.tower_autocast_dtype != "auto":
        return config.tower_autocast_dtype
    return "bfloat16" if has_accelerator() or cpu_has_native_bf16() else None


def check_processes(config: DemoConfig) -> None:
    """Refuse a process count that the threads or the batch sizes cannot be split over."""
    processes = config.processes
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"`processes` must be a positive int; got {processes!r}.")
    if config.threads < processes:
        raise ValueError(f"`threads` ({config.threads}) must be at least `processes` ({processes}): one each.")
    for name in ("batch_size", "stage2_batch_size"):
        value = getattr(config, name)
        if value is not None and value % processes:
            raise ValueError(f"`{name}` ({value}) must be a multiple of `processes` ({processes}).")


def train_stages(
    config: DemoConfig, data: Path, output: Path, curve: TargetCurve | None = None
) -> tuple[Any, Any, dict[str, list[dict]]]:
    """Stage 1 from scratch, then stage 2 from stage 1; returns the final model, processor and both logs.
    With `curve`, the model is also evaluated during both stages. With several `processes`, they train one model
    (DDP) and this process loads the result."""
    processes = training_processes(config)
    if processes == 1:
        return _train_both_stages(config, data, output, 1, curve)
    port = _free_loopback_port()
    curve_file = output / "curve-points.json"
    curve_file.unlink(missing_ok=True)
    torch.multiprocessing.start_processes(
        _train_rank,
        args=(processes, port, asdict(config), str(data), str(output), curve is not None),
        nprocs=processes,
        start_method="spawn",
    )
    if curve is not None:
        written = json.loads(curve_file.read_text())
        curve.points, curve.cpu_s = written["points"], written["cpu_s"]
        curve_file.unlink()
    histories = {
        stage: json.loads((output / folder / "training_log.json").read_text())
        for stage, folder in (("stage 1", "stage1"), ("stage 2", "stage2"))
    }
    model, processor = load_model(output / "stage2")
    return model, processor, histories


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train_rank(
    rank: int, processes: int, port: int, config_fields: dict[str, Any], data: str, output: str, with_curve: bool
) -> None:
    """One training process of `train_stages` (started by torch.multiprocessing: rank first)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(processes),
        LOCAL_WORLD_SIZE=str(processes),
    )
    config = DemoConfig(**config_fields)
    curve = None
    if with_curve and rank == 0:  # rank 0 evaluates; the others wait for it at the next step
        _, evaluate = demo_evaluator(config, Path(output) / "data")
        curve = TargetCurve(config.curve_every, lambda model, processor: evaluate(model, processor).metrics)
    _train_both_stages(config, Path(data), Path(output), processes, curve)
    if curve is not None:
        points = {"points": curve.points, "cpu_s": curve.cpu_s}
        (Path(output) / "curve-points.json").write_text(json.dumps(points) + "\n")


def _train_both_stages(
    config: DemoConfig, data: Path, output: Path, processes: int, curve: TargetCurve | None
) -> tuple[Any, Any, dict[str, list[dict]]]:
    common = dict(
        data=str(data),
        warmup_steps=config.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": config.min_learning_rate_ratio},
        weight_decay=config.weight_decay,
        save_strategy="no",
        torch_threads=config.threads // processes,
        seed=config.seed,
        logging_steps=5,
        dataloader_num_workers=0,
        image_cache_mb=256,  # the 12,000 training images take 141 MB decoded: each is decoded once, not every epoch
        vision_learning_rate_multiplier=config.vision_learning_rate_multiplier,
        tower_autocast_dtype=resolved_autocast_dtype(config),
        attn_implementation=config.attn_implementation,
        # Every step of either stage gives every parameter a gradient: DDP need not search the graph for unused ones.
        ddp_find_unused_parameters=False,
    )
    if config.hard_negative_group_size is not None:
        common.update(hard_negative_field="colour_group", hard_negative_group_size=config.hard_negative_group_size)
    common.update(config.train_overrides)
    histories = {}
    from_scratch = config.preset
    if config.architecture_overrides:
        from_scratch = str(write_architecture(config, output / "architecture.json"))
    print(f"\n== Stage 1: image-caption pairs, {config.stage1_steps} steps, from scratch ({config.preset} preset)")
    stage1 = train(
        from_scratch=from_scratch,
        output_dir=str(output / "stage1"),
        stage=1,
        max_steps=config.stage1_steps,
        learning_rate=config.stage1_learning_rate,
        per_device_train_batch_size=config.batch_size // processes,
        callbacks=curve.for_stage("stage 1", 0) if curve else (),
        **common,
    )
    histories["stage 1"] = stage1.log_history
    print(f"\n== Stage 2: regions added, {config.stage2_steps} steps")
    stage2 = train(
        model=str(output / "stage1"),
        output_dir=str(output / "stage2"),
        stage=2,
        max_steps=config.stage2_steps,
        learning_rate=config.stage2_learning_rate,
        max_regions_per_image=config.max_regions_per_image,
        per_device_train_batch_size=(config.stage2_batch_size or config.batch_size) // processes,
        callbacks=curve.for_stage("stage 2", config.stage1_steps) if curve else (),
        **{**common, "ema_decay": config.ema_decay, **config.stage2_train_overrides},
    )
    histories["stage 2"] = stage2.log_history
    return stage2.model, stage2.processor, histories


class TargetCurve(TrainerCallback):
    """Evaluates the model being trained every `every` steps and at the end of each stage: the targets' metrics
    against the steps trained, to see how far from a target a run is and how fast it approaches it. The last point of
    a stage is of the stage's final model: with `ema_decay`, the weight average; the points before it are of the
    weights being trained.

    Args:
        every: evaluate every this many steps of a stage.
        evaluate: (model, processor) -> metrics (the demo's own evaluation on its evaluation split).
    """

    def __init__(self, every: int, evaluate: Callable[[Any, Any], dict[str, float]]) -> None:
        self.every = every
        self.evaluate = evaluate
        self.points: list[dict[str, Any]] = []
        self.cpu_s = 0.0  # spent evaluating: the demo leaves it out of the training time
        self.stage, self.offset = "", 0

    def for_stage(self, stage: str, offset: int) -> list[TrainerCallback]:
        """This callback, set to record the points of `stage`, which starts after `offset` steps."""
        self.stage, self.offset = stage, offset
        return [self]

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None, **kwargs: Any
    ) -> None:
        if state.global_step % self.every == 0 and state.global_step != state.max_steps:
            self._add_point(state, model, processing_class)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None, **kwargs: Any
    ) -> None:
        # The stage's last point is of its final model: with `ema_decay`, the weight average, put in before this.
        self._add_point(state, model, processing_class)

    def _add_point(self, state: Any, model: Any, processing_class: Any) -> None:
        began = time.process_time()
        metrics = self.evaluate(model, processing_class)
        model.train()
        self.cpu_s += time.process_time() - began
        point = {"stage": self.stage, "step": self.offset + state.global_step}
        self.points.append({**point, **{key: metrics.get(key) for key in TARGETS}})
        shown = ", ".join(f"{key} {metrics[key]:.3f}" for key in TARGETS if metrics.get(key) is not None)
        print(f"[curve] step {point['step']}: {shown}", flush=True)


def write_architecture(config: DemoConfig, path: Path) -> Path:
    """The preset with `architecture_overrides` applied, as the JSON file `mmgem train --from-scratch` reads."""
    spec = architecture(config.preset, **config.architecture_overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def export_model(stage2: Path, folder: Path) -> Path:
    """The Hub-ready folder (weights, remote code, processor, sentence-transformers files, model card)."""
    return export_checkpoint(stage2, folder, overwrite=True, license="apache-2.0")


@torch.no_grad()
def check_reload(folder: Path, model: Any, processor: Any, records: Sequence[Any]) -> dict[str, float]:
    """Reload the exported folder with AutoModel and SentenceTransformer; both must give the trained embeddings."""
    from sentence_transformers import SentenceTransformer

    images = [r.load_image() for r in records[:4]]
    texts = [r.caption for r in records[:4]]
    expected_images = encode_images(model, processor, images)
    expected_texts = encode_texts(model, processor, texts)
    auto_model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    auto_processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    st_images = torch.as_tensor(st.encode(images, convert_to_tensor=True))
    st_texts = torch.as_tensor(st.encode(texts, convert_to_tensor=True))
    auto_images = encode_images(auto_model, auto_processor, images)
    auto_texts = encode_texts(auto_model, auto_processor, texts)
    return {
        "automodel_image_max_diff": float((auto_images - expected_images).abs().max()),
        "automodel_text_max_diff": float((auto_texts - expected_texts).abs().max()),
        "sentence_transformers_image_max_diff": float((st_images.float() - expected_images).abs().max()),
        "sentence_transformers_text_max_diff": float((st_texts.float() - expected_texts).abs().max()),
    }


def target_report(metrics: dict[str, float], wall_s: float | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """The targets table (with the wall time, when given, against `WALL_TIME_TARGET_S`) and, per metric target,
    the measured value and whether it is met."""
    results = {}
    lines = [
        "| Target                     | Needed   | Measured | Met |",
        "|----------------------------|----------|----------|-----|",
    ]
    for key, minimum in TARGETS.items():
        value = metrics.get(key)
        met = value is not None and value >= minimum
        results[key] = {"target": minimum, "measured": value, "met": met}
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"| {key:<26} | >= {minimum:<5} | {shown:<8} | {'yes' if met else 'NO':<3} |")
    if wall_s is not None:
        met = wall_s <= WALL_TIME_TARGET_S
        needed, shown = f"<= {WALL_TIME_TARGET_S:.0f} s", f"{wall_s:.0f} s"
        lines.append(f"| {'wall time':<26} | {needed:<8} | {shown:<8} | {'yes' if met else 'NO':<3} |")
    return "\n".join(lines), results


def print_examples(result: Any, num_captions: int = 6, num_regions: int = 8) -> None:
    print("\nExample captions (test images; reference -> generated):")
    for reference, generated in result.captions[:num_captions]:
        mark = "=" if reference == generated else "x"
        print(f"  [{mark}] {reference!r} -> {generated!r}")
    print("Example region captions (reference -> generated):")
    for reference, generated in result.region_captions[:num_regions]:
        mark = "=" if reference == generated else "x"
        print(f"  [{mark}] {reference!r} -> {generated!r}")


def demo_evaluator(config: DemoConfig, data: Path) -> tuple[list[Any], Callable[..., Any]]:
    """The records of the evaluation split in the dataset folder `data`, and the demo's evaluation of a model on them:
    `evaluate(model, processor, show_progress=False)` -> `mmgem.evaluation.evaluate_model`'s result."""
    labels = json.loads((data / "labels.json").read_text())
    records = load_jsonl_records(data / f"{config.eval_split}.jsonl")
    templates, reduction = templates_for(labels)

    def evaluate(model: Any, processor: Any, show_progress: bool = False) -> Any:
        return evaluate_model(
            model,
            processor,
            records,
            classes=labels["classes"],
            templates=templates,
            template_reduction=reduction,
            batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens,
            num_beams=config.num_beams,
            progress=show_progress,
        )

    return records, evaluate


def _processes_phrase(count: int) -> str:
    return "1 training process" if count == 1 else f"{count} training processes"


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (the training processes)."""
    try:
        import resource  # POSIX only
    except ImportError:  # elsewhere, this process's own
        return time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# ---------------------------------------------------------------------------------------------------------- main
def run_demo(output_dir: str | Path, config: DemoConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole demo into `output_dir`; returns the summary (also written to `summary.json`)."""
    config = config or DemoConfig()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run_demo(Path(output_dir), config, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(output: Path, config: DemoConfig, progress: bool) -> dict[str, Any]:
    from mmgem.plots import plot_loss_curves, plot_retrieval_grid, plot_target_curves  # matplotlib: only here

    if config.eval_split not in ("val", "test"):
        raise ValueError(f"`eval_split` must be 'val' or 'test'; got {config.eval_split!r}.")
    if config.curve_every is not None and config.curve_every < 1:
        raise ValueError(f"`curve_every` must be None or a positive int; got {config.curve_every!r}.")
    if not 0.0 <= config.min_learning_rate_ratio <= 1.0:
        raise ValueError(f"`min_learning_rate_ratio` must be in [0, 1]; got {config.min_learning_rate_ratio!r}.")
    if isinstance(config.num_beams, bool) or not isinstance(config.num_beams, int) or config.num_beams < 1:
        raise ValueError(f"`num_beams` must be a positive int; got {config.num_beams!r}.")
    check_processes(config)
    check_autocast_dtype(resolved_autocast_dtype(config))
    check_attention(config.attn_implementation)
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    paths = prepare_data(config, output / "data")
    timings["data_s"] = time.perf_counter() - start

    records, evaluate = demo_evaluator(config, output / "data")
    curve = None
    if config.curve_every:
        curve = TargetCurve(config.curve_every, lambda model, processor: evaluate(model, processor).metrics)
    mark, cpu_mark = time.perf_counter(), _cpu_seconds()
    model, processor, histories = train_stages(config, paths["train"], output, curve)
    timings["training_s"] = time.perf_counter() - mark
    # CPU seconds of the training processes: on a busy machine wall time says little, CPU time still measures the work.
    timings["training_cpu_s"] = _cpu_seconds() - cpu_mark - (curve.cpu_s if curve else 0.0)
    if curve:
        timings["curve_evaluation_cpu_s"] = curve.cpu_s

    mark, cpu_mark = time.perf_counter(), time.process_time()
    result = evaluate(model, processor, progress)
    write_metrics(result.metrics, output / "metrics.json")
    timings["evaluation_s"] = time.perf_counter() - mark
    timings["evaluation_cpu_s"] = time.process_time() - cpu_mark

    mark = time.perf_counter()
    model_folder = export_model(output / "stage2", output / "model")
    reload = check_reload(model_folder, model, processor, records)
    timings["export_and_reload_s"] = time.perf_counter() - mark

    plot_loss_curves(histories, output / "loss_curves.png")
    if curve:
        (output / "curve.json").write_text(json.dumps(curve.points, indent=1) + "\n")
        plot_target_curves(curve.points, TARGETS, output / "target_curves.png")
    images = [r.load_image() for r in records]
    plot_retrieval_grid(images, [r.caption for r in records], result.similarity, output / "retrieval_grid.png")
    timings["total_s"] = time.perf_counter() - start

    table = format_table(
        result.metrics, title=f"MM-GEM demo, held-out {config.eval_split} split ({len(records)} images)"
    )
    targets_table, targets = target_report(result.metrics, timings["total_s"])
    summary = {
        "config": asdict(config),
        "tower_autocast_dtype": resolved_autocast_dtype(config),
        "metrics": result.metrics,
        "targets": targets,
        "timings": timings,
        "reload_check": reload,
        "model_folder": str(model_folder),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n" + table)
    print("\n" + targets_table)
    print_examples(result)
    print(
        "\nReloaded " + str(model_folder) + " with AutoModel and SentenceTransformer: max embedding difference "
        f"{max(reload.values()):.2e}"
    )
    print(
        f"Time: data {timings['data_s']:.0f} s, training {timings['training_s']:.0f} s "
        f"({timings['training_cpu_s']:.0f} CPU s), evaluation "
        f"{timings['evaluation_s']:.0f} s ({timings['evaluation_cpu_s']:.0f} CPU s), export + reload "
        f"{timings['export_and_reload_s']:.0f} s, total "
        f"{timings['total_s']:.0f} s ({config.threads} torch threads, {_processes_phrase(training_processes(config))})"
    )
    print(f"Wrote {output / 'metrics.json'}, {output / 'loss_curves.png'}, {output / 'retrieval_grid.png'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("demo", __doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="demo-output", help="where everything is written")
    parser.add_argument("--threads", type=int, help=f"torch CPU threads (default {DemoConfig.threads})")
    parser.add_argument("--stage1-steps", type=int, help=f"stage-1 training steps (default {DemoConfig.stage1_steps})")
    parser.add_argument("--stage2-steps", type=int, help=f"stage-2 training steps (default {DemoConfig.stage2_steps})")
    parser.add_argument("--seed", type=int, help=f"training seed (default {DemoConfig.seed}; the data do not change)")
    parser.add_argument("--num-train", type=int, help=f"training images (default {DemoConfig.num_train})")
    parser.add_argument("--eval-split", choices=("val", "test"), help="split to evaluate on (default test)")
    parser.add_argument(
        "--curve-every",
        type=int,
        help="also evaluate every N steps of each stage: OUT/curve.json and OUT/target_curves.png",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds; the targets are not met)")
    parser.add_argument("--no-progress", action="store_true", help="hide the evaluation progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = DemoConfig(**QUICK) if args.quick else DemoConfig()
    with checking_user_input():
        for name in ("threads", "stage1_steps", "stage2_steps", "num_train", "curve_every"):
            value = getattr(args, name)
            if value is not None:
                if value < 1:
                    raise ValueError(f"`--{name.replace('_', '-')}` must be a positive int; got {value}.")
                setattr(config, name, value)
        if args.seed is not None:
            if args.seed < 0:
                raise ValueError(f"`--seed` must be a non-negative int; got {args.seed}.")
            config.seed = args.seed
        if args.eval_split:
            config.eval_split = args.eval_split
    run_demo(args.output_dir, config, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
