"""Train and evaluate one task of the experiments with the project's own code, and record what it cost.

Every MM-GEM arm goes through `modeling_mmgem.train.train` (HF Trainer, `MMGEMCollator`) and
`modeling_mmgem.evaluate.evaluate_model`; the CLIP baseline through the HF Trainer with the same options and the same
`evaluate_model` (see `experiments.clip_baseline`). Results are JSON files, one per arm and seed, keyed by a
fingerprint of everything they depend on, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .settings import LONG_VARIANTS, Budget, Task, default_grid, experiment_architecture

SHORT_TASKS = ("retrieval", "zero_shot")
REGION_TASKS = ("region_captioning", "region_retrieval")


# ---------------------------------------------------------------------------------------------------------- data
def prepare_datasets(budget: Budget, folder: Path, progress: bool = True) -> dict[str, Path]:
    """One synthetic dataset per long-caption variant (same images and short captions, other long openings).

    A folder is reused when its stamp matches the settings; generation is deterministic and atomic.
    """
    from modeling_mmgem.synthetic import generate_dataset

    roots = {}
    for variant, preamble in LONG_VARIANTS.items():
        root = folder / variant
        settings = dict(
            num_train=budget.num_train, num_val=budget.num_val, num_test=budget.num_test,
            image_size=budget.image_size, seed=budget.data_seed, max_objects=budget.max_objects,
            num_heldout_pairs=0, preamble_min_words=preamble,
        )  # fmt: skip
        stamp = root / "experiment_settings.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == settings):
            generate_dataset(root, overwrite=True, progress=progress, **settings)
            stamp.write_text(json.dumps(settings) + "\n")
        roots[variant] = root
    return roots


def long_caption_records(records: Sequence[Any]) -> list[Any]:
    """Copies of the records whose `caption` is the long description (what retrieval then ranks)."""
    from dataclasses import replace

    return [replace(r, caption=r.long_caption, regions=[]) for r in records]


# ---------------------------------------------------------------------------------------------------------- timing
class Stopwatch:
    """Wall-clock and process CPU seconds (all threads) of a block."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able settings: a result is reused only when it matches."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------- options
def training_options(budget: Budget, seed: int, steps: int, batch_size: int, learning_rate: float,
                     threads: int) -> dict[str, Any]:  # fmt: skip
    """The `TrainingArguments` values every arm gets (MM-GEM through `train`, CLIP through the Trainer)."""
    return dict(
        max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=budget.warmup, weight_decay=budget.weight_decay, max_grad_norm=1.0,
        seed=seed, data_seed=seed, save_strategy="no", logging_steps=max(1, steps // 10), logging_first_step=True,
        report_to="none", dataloader_num_workers=0, disable_tqdm=True, use_cpu=True,
    )  # fmt: skip


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(value, stream, indent=1, sort_keys=True)
    os.replace(temporary, path)


def _loss_summary(log_history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The logged loss terms (step, loss_contrastive, loss_caption) for the report's curves."""
    rows = [
        {k: h[k] for k in ("step", "loss", "loss_contrastive", "loss_caption") if k in h}
        for h in log_history
        if "loss" in h
    ]
    return {"curve": rows, "final": rows[-1] if rows else {}}


# ---------------------------------------------------------------------------------------------------------- runner
class TaskRunner:
    """Runs tasks of one budget; results go to `output/results/<arm>/seed<k>.json`."""

    def __init__(self, budget: Budget, output: Path, datasets: dict[str, Path], threads: int, progress: bool = False):
        self.budget = budget
        self.output = Path(output)
        self.datasets = {k: Path(v) for k, v in datasets.items()}
        self.threads = threads
        self.progress = progress
        self.short_spec = experiment_architecture(budget.preset, budget.short_vocab_size)
        self.long_spec = experiment_architecture(budget.preset, budget.long_vocab_size)

    # ------------------------------------------------------------------ bookkeeping
    def result_path(self, arm: str, seed: int) -> Path:
        return self.output / "results" / arm / f"seed{seed}.json"

    def task_fingerprint(self, task: Task) -> str:
        return fingerprint(self.budget.as_dict(), asdict(task), self.short_spec, self.long_spec)

    def produced_arms(self, task: Task) -> list[str]:
        if task.kind == "core":
            return ["joint", f"pool_{default_grid(self.short_spec)}", "stage1", "stage1_more", "stage2"]
        return [task.arm]

    def cached(self, task: Task) -> dict[str, dict[str, Any]] | None:
        """The task's results when all of them exist with the current fingerprint, else None."""
        found = {}
        expected = self.task_fingerprint(task)
        for arm in self.produced_arms(task):
            path = self.result_path(arm, task.seed)
            if not path.is_file():
                return None
            result = json.loads(path.read_text())
            if result.get("fingerprint") != expected:
                return None
            found[arm] = result
        return found

    def run(self, task: Task) -> dict[str, dict[str, Any]]:
        """Train and evaluate a task (or reuse its results); returns `{arm: result}`."""
        cached = self.cached(task)
        if cached is not None:
            return cached
        torch.set_num_threads(self.threads)
        work = self.output / "models" / task.arm / f"seed{task.seed}"
        if work.exists():
            shutil.rmtree(work)
        method = {
            "core": self._core, "single": self._single, "long_mmgem": self._long_mmgem, "long_clip": self._long_clip,
        }[task.kind]  # fmt: skip
        results = method(task, work)
        base = {"fingerprint": self.task_fingerprint(task), "seed": task.seed, "task": asdict(task),
                "threads": self.threads}  # fmt: skip
        for arm, result in results.items():
            result.update(base, arm=arm)
            _write_json(self.result_path(arm, task.seed), result)
        shutil.rmtree(work, ignore_errors=True)  # model folders are not kept: results are
        return results

    # ------------------------------------------------------------------ MM-GEM pieces
    def _train_mmgem(self, task: Task, output: Path, spec: dict[str, Any] | None, data: Path, *, stage: int = 1,
                     start: Path | None = None, steps: int, batch_size: int, learning_rate: float,
                     long: bool = False) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        """One `modeling_mmgem.train.train` call; returns the result and its cost."""
        import transformers

        from modeling_mmgem.train import train

        options = training_options(self.budget, task.seed, steps, batch_size, learning_rate, self.threads)
        source: dict[str, Any]
        if start is None:
            spec_path = output.parent / f"{output.name}.spec.json"
            _write_json(spec_path, spec)
            source = {"from_scratch": str(spec_path)}
            # `train` builds the model before the Trainer seeds anything: seed here so that the seed sets the init.
            transformers.set_seed(task.seed)
        else:
            source = {"model": str(start)}
        extra = {"max_regions_per_image": self.budget.max_regions_per_image} if stage == 2 else {}
        with Stopwatch() as clock:
            result = train(
                **source, data=str(data / "train.jsonl"), output_dir=str(output), stage=stage,
                use_long_caption=long, torch_threads=self.threads, **extra, **options,
            )  # fmt: skip
        cost = {
            "train_wall_s": clock.wall, "train_cpu_s": clock.cpu, "steps": steps, "batch_size": batch_size,
            "trainer_runtime_s": result.metrics.get("train_runtime"), "stage": stage,
            "parameters": sum(p.numel() for p in result.model.parameters()),
        }  # fmt: skip
        return result, {"train": cost, "losses": _loss_summary(result.log_history)}

    def _evaluate_mmgem(self, model: Any, processor: Any, data: Path, regions: bool) -> dict[str, Any]:
        """Test-split metrics with `evaluate_model`; captioning is timed on its own (generation cost)."""
        from modeling_mmgem.evaluate import evaluate_model, templates_for
        from modeling_mmgem.synthetic import load_labels
        from modeling_mmgem.train import load_records

        labels = load_labels(data)
        records = load_records(data / "test.jsonl")
        common = dict(
            classes=labels["classes"], templates=templates_for(labels), batch_size=self.budget.eval_batch_size,
            max_new_tokens=self.budget.max_new_tokens, progress=self.progress,
        )  # fmt: skip
        with Stopwatch() as clock:
            metrics = dict(evaluate_model(model, processor, records, tasks=SHORT_TASKS, **common).metrics)
        with Stopwatch() as generation:
            captioned = evaluate_model(model, processor, records, tasks=("captioning",), **common)
        metrics.update(captioned.metrics)
        examples = {"captions": captioned.captions[:5]}
        if regions:
            regional = evaluate_model(model, processor, records, tasks=REGION_TASKS, **common)
            metrics.update(regional.metrics)
            examples["region_captions"] = regional.region_captions[:5]
        n = len(records)
        return {
            "metrics": metrics,
            "examples": examples,
            "generation": {"wall_s": generation.wall, "cpu_s": generation.cpu, "images": n,
                           "ms_per_image": 1000 * generation.wall / n, "cpu_ms_per_image": 1000 * generation.cpu / n},
            "eval_wall_s": clock.wall + generation.wall,
        }  # fmt: skip

    def _short_spec(self, overrides: dict[str, Any]) -> dict[str, Any]:
        spec = json.loads(json.dumps(self.short_spec))
        spec.update(overrides)
        return spec

    # ------------------------------------------------------------------ task kinds
    def _single(self, task: Task, work: Path) -> dict[str, dict[str, Any]]:
        data = self.datasets["strict"]
        b = self.budget
        trained, record = self._train_mmgem(
            task, work / "stage1", self._short_spec(task.overrides), data, steps=b.steps, batch_size=b.batch_size,
            learning_rate=b.learning_rate,
        )  # fmt: skip
        record.update(self._evaluate_mmgem(trained.model, trained.processor, data, regions=False))
        return {task.arm: record}

    def _core(self, task: Task, work: Path) -> dict[str, dict[str, Any]]:
        """The joint arm (stage 1), then from its checkpoint: more stage 1, or stage 2, for the same steps."""
        data = self.datasets["strict"]
        b = self.budget
        stage1, joint = self._train_mmgem(
            task, work / "stage1", self._short_spec({}), data, steps=b.steps, batch_size=b.batch_size,
            learning_rate=b.learning_rate,
        )  # fmt: skip
        joint.update(self._evaluate_mmgem(stage1.model, stage1.processor, data, regions=True))
        results = {"joint": joint, f"pool_{default_grid(self.short_spec)}": joint, "stage1": joint}
        for arm, stage in (("stage1_more", 1), ("stage2", 2)):
            continued, record = self._train_mmgem(
                task, work / arm, None, data, stage=stage, start=work / "stage1", steps=b.extra_steps,
                batch_size=b.batch_size, learning_rate=b.extra_learning_rate,
            )  # fmt: skip
            record.update(self._evaluate_mmgem(continued.model, continued.processor, data, regions=True))
            record["train"]["stage1_steps"] = b.steps
            results[arm] = record
        return {arm: json.loads(json.dumps(r)) for arm, r in results.items()}

    def _evaluate_long(self, model: Any, processor: Any, data: Path) -> dict[str, Any]:
        from modeling_mmgem.evaluate import evaluate_model
        from modeling_mmgem.train import load_records

        records = long_caption_records(load_records(data / "test.jsonl"))
        with Stopwatch() as clock:
            result = evaluate_model(
                model, processor, records, tasks=("retrieval",), batch_size=self.budget.eval_batch_size,
                progress=self.progress,
            )  # fmt: skip
        return {"metrics": dict(result.metrics), "eval_wall_s": clock.wall}

    def _long_mmgem(self, task: Task, work: Path) -> dict[str, dict[str, Any]]:
        data = self.datasets[task.variant]
        spec = json.loads(json.dumps(self.long_spec))
        spec["text_config"].update(task.overrides)
        b = self.budget
        trained, record = self._train_mmgem(
            task, work / "model", spec, data, steps=b.long_steps, batch_size=b.long_batch_size,
            learning_rate=b.learning_rate, long=True,
        )  # fmt: skip
        record.update(self._evaluate_long(trained.model, trained.processor, data))
        return {task.arm: record}

    def _long_clip(self, task: Task, work: Path) -> dict[str, dict[str, Any]]:
        import transformers

        from modeling_mmgem.data import ImageCaptionDataset
        from modeling_mmgem.train import load_records, training_texts

        from .clip_baseline import train_clip

        data = self.datasets[task.variant]
        b = self.budget
        records = load_records(data / "train.jsonl")
        dataset = ImageCaptionDataset(records, use_long_caption=True, with_regions=False)
        options = training_options(b, task.seed, b.long_steps, b.long_batch_size, b.learning_rate, self.threads)
        transformers.set_seed(task.seed)  # the same seeding as the MM-GEM arms: init, then data order
        with Stopwatch() as clock:
            model, processor, metrics = train_clip(
                self.long_spec, dataset, training_texts(records, use_long_caption=True), work / "clip", options
            )
        record = {
            "train": {"train_wall_s": clock.wall, "train_cpu_s": clock.cpu, "steps": b.long_steps,
                      "batch_size": b.long_batch_size, "trainer_runtime_s": metrics.get("train_runtime"), "stage": 1,
                      "parameters": sum(p.numel() for p in model.parameters())},
        }  # fmt: skip
        record.update(self._evaluate_long(model, processor, data))
        return {task.arm: record}


def run_task_in_worker(budget: Budget, output: str, datasets: dict[str, str], threads: int, task: Task):
    """Entry point of a worker process: run one task, return its results."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runner = TaskRunner(budget, Path(output), {k: Path(v) for k, v in datasets.items()}, threads)
    with Stopwatch() as clock:
        results = runner.run(task)
    return task, results, clock.wall


# ---------------------------------------------------------------------------------------------------------- data stats
def _token_at(ends: Sequence[int], char: int) -> int:
    """Index of the token holding character `char`, from the tokens' end offsets."""
    return next((i for i, end in enumerate(ends) if end > char), len(ends))


def long_caption_visibility(root: Path, vocab_size: int, limit: int) -> dict[str, float]:
    """How much of the test split's long descriptions a text encoder cut at `limit` text tokens sees.

    The tokenizer is the long-text arms' own (trained on the variant's training texts). Per description: the token
    at which the details start (the sentence "There is/are ..."), and which objects are fully described (their
    "It is <size> and <colour>, ... placed ..." sentence ends) within the first `limit` tokens.
    """
    import re

    from modeling_mmgem.build import train_tokenizer
    from modeling_mmgem.train import load_records, training_texts

    tokenizer = train_tokenizer(training_texts(load_records(root / "train.jsonl"), True), vocab_size=vocab_size)
    starts, lengths, seen_objects, total_objects, blind = [], [], 0, 0, 0
    for record in load_records(root / "test.jsonl"):
        text = record.long_caption
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [end for _, end in encoding["offset_mapping"]]
        detail = re.search(r"There (is|are) ", text)
        start = _token_at(ends, detail.start()) if detail else len(ends)
        objects = [m.end() - 1 for m in re.finditer(r"It is (small|large) and \w+, and it is placed [^.]*\.", text)]
        visible = sum(_token_at(ends, end) < limit for end in objects)
        starts.append(start)
        lengths.append(len(ends))
        seen_objects += visible
        total_objects += len(objects)
        blind += start >= limit
    return {
        "detail_start_median": float(sorted(starts)[len(starts) // 2]),
        "detail_start_min": float(min(starts)),
        "detail_start_max": float(max(starts)),
        "tokens_median": float(sorted(lengths)[len(lengths) // 2]),
        "tokens_max": float(max(lengths)),
        "objects_visible": seen_objects / max(total_objects, 1),
        "captions_without_detail": blind / max(len(starts), 1),
        "limit": limit,
    }
