"""Train and evaluate one task of the experiments with the project's own code, and record what it cost.

Every MM-GEM arm goes through `mmgem.training.train.train` (HF Trainer, `MMGEMCollator`) and
`mmgem.evaluation.evaluate.evaluate_model`; the CLIP baseline through the HF Trainer with the same options and the same
`evaluate_model` (see `experiments.clip_baseline`). Results are JSON files, one per arm and seed, keyed by a
fingerprint of everything they depend on, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from mmgem.build import train_tokenizer
from mmgem.data.records import ImageCaptionDataset, load_records
from mmgem.evaluation.evaluate import evaluate_model, templates_for
from mmgem.files import write_json_atomic
from mmgem.loading import load_model
from mmgem.synthetic import ensure_dataset, load_labels
from mmgem.training.train import build_from_scratch, train, training_texts

from .clip_baseline import build_clip, train_clip
from .settings import CLIP_CONTEXT, LONG_VARIANTS, Budget, Task, default_grid, experiment_architecture

SHORT_TASKS = ("retrieval", "zero_shot")
REGION_TASKS = ("region_captioning", "region_retrieval")


# ---------------------------------------------------------------------------------------------------------- data
def prepare_datasets(budget: Budget, folder: Path, progress: bool = True) -> dict[str, Path]:
    """One synthetic dataset per long-caption variant (same images and short captions, other long openings).

    A folder is reused when its stamp matches the settings; generation is deterministic and atomic.
    """
    roots = {}
    for variant, preamble in LONG_VARIANTS.items():
        roots[variant] = ensure_dataset(
            folder / variant,
            progress=progress,
            num_train=budget.num_train,
            num_val=budget.num_val,
            num_test=budget.num_test,
            image_size=budget.image_size,
            seed=budget.data_seed,
            max_objects=budget.max_objects,
            num_heldout_pairs=0,
            preamble_min_words=preamble,
        )["root"]
    return roots


def long_caption_records(records: Sequence[Any]) -> list[Any]:
    """Copies of the records whose `caption` is the long description (what retrieval then ranks)."""

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
def training_options(
    budget: Budget, seed: int, steps: int, batch_size: int, learning_rate: float, threads: int
) -> dict[str, Any]:
    """The `TrainingArguments` values every arm gets (MM-GEM through `train`, CLIP through the Trainer)."""
    return dict(
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=budget.warmup,
        weight_decay=budget.weight_decay,
        max_grad_norm=1.0,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        logging_steps=max(1, steps // 10),
        logging_first_step=True,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=True,
    )


def _write_json(path: Path, value: Any) -> None:
    write_json_atomic(path, value, indent=1, sort_keys=True)


def _loss_summary(log_history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The logged loss terms (step, loss_contrastive, loss_caption) for the report's curves."""
    rows = [
        {k: h[k] for k in ("step", "loss", "loss_contrastive", "loss_caption") if k in h}
        for h in log_history
        if "loss" in h
    ]
    return {"curve": rows, "final": rows[-1] if rows else {}}


# ---------------------------------------------------------------------------------------------------------- runner
def _cost(clock: Stopwatch, steps: int, batch_size: int, metrics: dict[str, Any], model: Any, **extra: Any):
    return {
        "train_wall_s": clock.wall,
        "train_cpu_s": clock.cpu,
        "steps": steps,
        "batch_size": batch_size,
        "trainer_runtime_s": metrics.get("train_runtime"),
        "parameters": sum(p.numel() for p in model.parameters()),
        **extra,
    }


class TaskRunner:
    """Runs tasks of one budget; results go to `output/results/<split>/<arm>/seed<k>.json`."""

    def __init__(
        self,
        budget: Budget,
        output: Path,
        datasets: dict[str, Path],
        threads: int,
        progress: bool = False,
        split: str = "test",
    ):
        if split not in ("val", "test"):
            raise ValueError(f"`split` must be 'val' or 'test'; got {split!r}.")
        self.split = split
        self.budget = budget
        self.output = Path(output)
        self.datasets = {k: Path(v) for k, v in datasets.items()}
        self.threads = threads
        self.progress = progress
        self.spec = experiment_architecture(budget.preset, budget.vocab_size)
        self._texts: list[str] | None = None

    # ------------------------------------------------------------------ bookkeeping
    def result_path(self, arm: str, seed: int) -> Path:
        return self.output / "results" / self.split / arm / f"seed{seed}.json"

    def task_fingerprint(self, task: Task) -> str:
        return fingerprint(self.budget.as_dict(), asdict(task), self.spec, self.split, LONG_VARIANTS)

    def produced_arms(self, task: Task) -> list[str]:
        if task.kind == "core":
            arms = ["joint", f"pool_{default_grid(self.spec)}", "stage1", "stage1_more", "stage2"]
            for variant in LONG_VARIANTS:
                arms += [f"long_{variant}_{m}{zs}" for zs in ("_zs", "") for m in ("mmgem77", "mmgem")]
            return arms
        if task.kind == "clip":
            return [f"long_{variant}_clip{zs}" for variant in LONG_VARIANTS for zs in ("_zs", "")]
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
        work.mkdir(parents=True)
        method = {"core": self._core, "single": self._single, "clip": self._clip}[task.kind]
        results = json.loads(json.dumps(method(task, work)))  # independent copies of shared records
        base = {
            "fingerprint": self.task_fingerprint(task),
            "seed": task.seed,
            "task": asdict(task),
            "threads": self.threads,
            "split": self.split,
        }
        for arm, result in results.items():
            result.update(base, arm=arm)
            _write_json(self.result_path(arm, task.seed), result)
        shutil.rmtree(work, ignore_errors=True)  # model folders are not kept: results are
        return results

    # ------------------------------------------------------------------ shared pieces
    def training_texts(self) -> list[str]:
        """Every training text of the run (captions, region captions, both variants' long descriptions).

        One tokenizer is trained on them for every arm, so that the long fine-tunes start from stage-1 models that
        already have tokens for the long descriptions' words, and CLIP and MM-GEM read the same token sequences.
        """
        if self._texts is None:
            texts = []
            for index, root in enumerate(self.datasets.values()):
                records = load_records(root / "train.jsonl")
                if index == 0:
                    texts += training_texts(records, use_long_caption=False)
                texts += [r.long_caption for r in records if r.long_caption]
            self._texts = texts
        return self._texts

    def _initial_model(self, task: Task, overrides: dict[str, Any], folder: Path) -> Path:
        """A new MM-GEM (seeded init, the run's tokenizer) saved to `folder`, for `train(model=folder)`."""
        import transformers

        spec = json.loads(json.dumps(self.spec))
        spec.update(overrides)
        transformers.set_seed(task.seed)
        model, processor = build_from_scratch(spec, self.training_texts())
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder

    def _train(
        self,
        task: Task,
        start: Path,
        output: Path,
        data: Path,
        *,
        stage: int = 1,
        steps: int,
        batch_size: int,
        learning_rate: float,
        long: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """One `mmgem.training.train.train` call from a model folder; returns the result and its cost."""
        options = training_options(self.budget, task.seed, steps, batch_size, learning_rate, self.threads)
        extra = {"max_regions_per_image": self.budget.max_regions_per_image} if stage == 2 else {}
        with Stopwatch() as clock:
            result = train(
                model=str(start),
                data=str(data / "train.jsonl"),
                output_dir=str(output),
                stage=stage,
                use_long_caption=long,
                torch_threads=self.threads,
                **extra,
                **options,
            )
        cost = _cost(clock, steps, batch_size, result.metrics, result.model, stage=stage)
        return result, {"train": cost, "losses": _loss_summary(result.log_history)}

    def _stage1(self, task: Task, work: Path, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Stage 1 from scratch on the image-caption pairs."""
        b = self.budget
        start = self._initial_model(task, overrides, work / "init")
        return self._train(
            task,
            start,
            work / "stage1",
            self.datasets["strict"],
            steps=b.steps,
            batch_size=b.batch_size,
            learning_rate=b.learning_rate,
        )

    def _evaluate_short(self, model: Any, processor: Any, regions: bool) -> dict[str, Any]:
        """Split metrics with `evaluate_model`; captioning is timed on its own (generation cost)."""
        data = self.datasets["strict"]
        labels = load_labels(data)
        records = load_records(data / f"{self.split}.jsonl")
        templates, reduction = templates_for(labels)
        common = dict(
            classes=labels["classes"],
            templates=templates,
            template_reduction=reduction,
            batch_size=self.budget.eval_batch_size,
            max_new_tokens=self.budget.max_new_tokens,
            progress=self.progress,
        )
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
            "generation": {
                "wall_s": generation.wall,
                "cpu_s": generation.cpu,
                "images": n,
                "ms_per_image": 1000 * generation.wall / n,
                "cpu_ms_per_image": 1000 * generation.cpu / n,
            },
            "eval_wall_s": clock.wall + generation.wall,
        }

    def _evaluate_long(self, model: Any, processor: Any, variant: str) -> dict[str, Any]:
        """Retrieval between the split's images and their long descriptions (`evaluate_model`, all arms)."""
        records = long_caption_records(load_records(self.datasets[variant] / f"{self.split}.jsonl"))
        with Stopwatch() as clock:
            result = evaluate_model(
                model,
                processor,
                records,
                tasks=("retrieval",),
                batch_size=self.budget.eval_batch_size,
                progress=self.progress,
            )
        return {"metrics": dict(result.metrics), "eval_wall_s": clock.wall}

    # ------------------------------------------------------------------ task kinds
    def _single(self, task: Task, work: Path) -> dict[str, dict[str, Any]]:
        trained, record = self._stage1(task, work, task.overrides)
        record.update(self._evaluate_short(trained.model, trained.processor, regions=False))
        return {task.arm: record}

    def _core(self, task: Task, work: Path) -> dict[str, dict[str, Any]]:
        """The joint stage-1 model, then from it: more stage 1 or stage 2 (claim 3), long fine-tunes (claim 4)."""
        b = self.budget
        stage1, joint = self._stage1(task, work, {})
        joint.update(self._evaluate_short(stage1.model, stage1.processor, regions=True))
        results = {"joint": joint, f"pool_{default_grid(self.spec)}": joint, "stage1": joint}
        for arm, stage in (("stage1_more", 1), ("stage2", 2)):
            continued, record = self._train(
                task,
                work / "stage1",
                work / arm,
                self.datasets["strict"],
                stage=stage,
                steps=b.extra_steps,
                batch_size=b.batch_size,
                learning_rate=b.extra_learning_rate,
            )
            record.update(self._evaluate_short(continued.model, continued.processor, regions=True))
            results[arm] = record
        results.update(self._long_mmgem(task, work, stage1, joint["train"]))
        return results

    def _cut_to_clip_context(self, source: Path, folder: Path) -> Path:
        """A copy of a saved MM-GEM whose LLM context (and so the processor's truncation) is CLIP's 77 tokens."""
        model, processor = load_model(str(source))
        model.config.text_config.max_position_embeddings = CLIP_CONTEXT
        processor.context_length = CLIP_CONTEXT
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder

    def _long_mmgem(self, task: Task, work: Path, stage1: Any, stage1_cost: dict[str, Any]) -> dict[str, Any]:
        """Zero-shot and fine-tuned long-description retrieval of the joint model, full context and cut to 77."""
        b = self.budget
        results = {}
        cut = self._cut_to_clip_context(work / "stage1", work / "stage1_77")
        for variant in LONG_VARIANTS:
            processor = stage1.processor
            for name, length in (("mmgem", processor.context_length), ("mmgem77", CLIP_CONTEXT)):
                saved, processor.context_length = processor.context_length, length
                try:
                    results[f"long_{variant}_{name}_zs"] = {
                        "train": dict(stage1_cost),
                        **self._evaluate_long(stage1.model, processor, variant),
                    }
                finally:
                    processor.context_length = saved
            for name, start in (("mmgem", work / "stage1"), ("mmgem77", cut)):
                tuned, record = self._train(
                    task,
                    start,
                    work / f"long_{variant}_{name}",
                    self.datasets[variant],
                    steps=b.long_steps,
                    batch_size=b.long_batch_size,
                    learning_rate=b.extra_learning_rate,
                    long=True,
                )
                record["stage1_train"] = stage1_cost
                record.update(self._evaluate_long(tuned.model, tuned.processor, variant))
                results[f"long_{variant}_{name}"] = record
                shutil.rmtree(work / f"long_{variant}_{name}", ignore_errors=True)
        return results

    def _clip(self, task: Task, work: Path) -> dict[str, dict[str, Any]]:
        """The CLIP baseline: stage 1 on the image-caption pairs (same budget as MM-GEM), then long fine-tunes."""
        import transformers

        b = self.budget
        transformers.set_seed(task.seed)  # the same seeding as the MM-GEM arms: init, then data order
        model, processor = build_clip(self.spec, self.training_texts())
        records = load_records(self.datasets["strict"] / "train.jsonl")
        short = ImageCaptionDataset(records, use_long_caption=False, with_regions=False)
        options = training_options(b, task.seed, b.steps, b.batch_size, b.learning_rate, self.threads)
        with Stopwatch() as clock:
            metrics = train_clip(model, processor, short, work / "stage1", options)
        stage1_cost = _cost(clock, b.steps, b.batch_size, metrics, model, stage=1)
        results = {}
        for variant in LONG_VARIANTS:
            results[f"long_{variant}_clip_zs"] = {
                "train": dict(stage1_cost),
                **self._evaluate_long(model, processor, variant),
            }
            tuned = copy.deepcopy(model)
            records = load_records(self.datasets[variant] / "train.jsonl")
            long = ImageCaptionDataset(records, use_long_caption=True, with_regions=False)
            options = training_options(
                b, task.seed, b.long_steps, b.long_batch_size, b.extra_learning_rate, self.threads
            )
            with Stopwatch() as clock:
                metrics = train_clip(tuned, processor, long, work / f"long_{variant}", options)
            results[f"long_{variant}_clip"] = {
                "train": _cost(clock, b.long_steps, b.long_batch_size, metrics, tuned, stage=1),
                "stage1_train": stage1_cost,
                **self._evaluate_long(tuned, processor, variant),
            }
        return results


def run_task_in_worker(budget: Budget, output: str, datasets: dict[str, str], threads: int, split: str, task: Task):
    """Entry point of a worker process: run one task, return its results."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runner = TaskRunner(budget, Path(output), {k: Path(v) for k, v in datasets.items()}, threads, split=split)
    with Stopwatch() as clock:
        results = runner.run(task)
    return task, results, clock.wall


# ---------------------------------------------------------------------------------------------------------- data stats
def _token_at(ends: Sequence[int], char: int) -> int:
    """Index of the token holding character `char`, from the tokens' end offsets."""
    return next((i for i, end in enumerate(ends) if end > char), len(ends))


def long_caption_visibility(
    root: Path, texts: Sequence[str], vocab_size: int, limit: int, split: str = "test"
) -> dict[str, float]:
    """How much of the test split's long descriptions a text encoder cut at `limit` text tokens sees.

    The tokenizer is the run's own (trained on `texts`, every training text). Per description: the token
    at which the details start (the sentence "There is/are ..."), and which objects are fully described (their
    "It is <size> and <colour>, ... placed ..." sentence ends) within the first `limit` tokens.
    """
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    starts, lengths, seen_objects, total_objects, blind = [], [], 0, 0, 0
    for record in load_records(root / f"{split}.jsonl"):
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
