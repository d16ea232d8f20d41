"""The evaluation engine: tasks (retrieval, zero-shot classification, captioning, regions) run over one
:class:`EmbeddingCache`, so tasks that share images or texts embed them once.

`mmgem evaluate --data` (:func:`mmgem.evaluation.evaluate.evaluate_model`) and `mmgem evaluate --benchmark`
(:mod:`mmgem.evaluation.benchmarks`) build these tasks from their data and run them with :func:`run_tasks`; they
differ only in how relevance is defined and how captions are scored:

- Retrieval: an image and a text match when `relevant[i, j]` (the benchmarks: text j was written for image i;
  `mmgem evaluate --data`: the two captions are equal after `normalize_text`, as a generated split repeats captions).
- Zero-shot: a class scores the image's cosine with its prompts, reduced by "mean" (prompt ensembling) or "max".
- Captioning: greedy (or beam) captions of the images, or of region boxes, scored by `scorer` (pycocoevalcap for the
  benchmarks, the project's own BLEU/CIDEr/exact match for `--data`).
- Regions: region captioning and region <-> text R@1 in one task (RefCOCOg); `distinct_texts=True` ranks the set of
  distinct region texts with same-text relevance instead of every sentence with its region.

Every metric key is `<task name>/<metric>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmgem.embedding import caption, encode_images, encode_regions, encode_texts
from mmgem.evaluation.metrics import class_scores, recall_at_k, same_text_relevance
from mmgem.optional import require

RECALL_KS = (1, 5, 10)
QUERY_BLOCK = 1024  # queries ranked at once (bounds the memory of a 25k x 5k similarity)
Scorer = Callable[[Sequence[str], Sequence[Sequence[str]]], dict[str, Any]]


# ---------------------------------------------------------------------------------------------------------- cache keys
def content_identity(value: Any) -> str:
    """What identifies an image in a cache key: its path, or a hash of its bytes or pixels."""
    if isinstance(value, str | Path):
        return str(value)
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    return hashlib.sha256(value.tobytes()).hexdigest()


def content_key(*parts: Any) -> str:
    """A short hash of images (paths, bytes or PIL images), texts and settings."""
    encoded = json.dumps(parts, default=content_identity, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:24]


def model_fingerprint(model: Any) -> str:
    """Identifies the weights (a hash of every parameter's sum and shape): caches never mix two models."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            digest.update(f"{name}{tuple(parameter.shape)}{float(parameter.double().sum()):.10e}".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------- cache
class EmbeddingCache:
    """Embeddings and generated captions of one model, computed once per content (in memory, and on disk when
    `cache_dir` is set). `computed` counts the items actually computed (for tests and logs)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        progress: bool = True,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        pad_regions: bool = True,
    ) -> None:
        self.model, self.processor = model, processor
        self.pad_regions = pad_regions  # images with regions padded to a square first (see `regions`)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size, self.progress = batch_size, progress
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams
        # On disk, entries of other weights must never be read back; in memory the cache lives with one model.
        self.fingerprint = model_fingerprint(model) if self.cache_dir else "in-memory"
        self.memory: dict[str, Any] = {}
        self.computed = {"images": 0, "texts": 0, "regions": 0, "captions": 0}

    def _cached(self, kind: str, key: str, compute: Callable[[], Any]) -> Any:
        name = f"{kind}-{self.fingerprint}-{key}"
        if name in self.memory:
            return self.memory[name]
        path = self.cache_dir / f"{name}.pt" if self.cache_dir else None
        if path is not None and path.is_file():
            value = torch.load(path, weights_only=True)
        else:
            value = compute()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_suffix(".tmp")
                torch.save(value, temporary)
                temporary.replace(path)
        self.memory[name] = value
        return value

    def _batching(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "progress": self.progress}

    def images(self, images: Sequence[Any]) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (images loaded batch by batch)."""

        def compute() -> torch.Tensor:
            self.computed["images"] += len(images)
            return encode_images(self.model, self.processor, list(images), **self._batching())

        return self._cached("images", content_key(list(images)), compute)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D]."""

        def compute() -> torch.Tensor:
            self.computed["texts"] += len(texts)
            return encode_texts(self.model, self.processor, list(texts), **self._batching())

        return self._cached("texts", content_key(list(texts)), compute)

    def regions(self, images: Sequence[Any], boxes: Sequence[list[list[float]]]) -> torch.Tensor:
        """L2-normalised region embeddings [sum R_i, D], in the order of `images` then their boxes (with
        `pad_regions`, images padded to a square first, so that the processor's center crop cuts no box away)."""

        def compute() -> torch.Tensor:
            self.computed["regions"] += sum(len(b) for b in boxes)
            return encode_regions(
                self.model, self.processor, list(images), boxes, pad_square=self.pad_regions, **self._batching()
            )

        key = content_key(list(images), [list(map(tuple, b)) for b in boxes], self.pad_regions)
        return self._cached("regions", key, compute)

    def captions(self, images: Sequence[Any], boxes: Sequence[list[list[float]]] | None = None) -> list[str]:
        """Greedy (or beam) captions of the images, or of each region (in the order of `regions`)."""

        def compute() -> list[str]:
            self.computed["captions"] += len(images) if boxes is None else sum(len(b) for b in boxes)
            decoding = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": False}
            return caption(
                self.model,
                self.processor,
                list(images),
                boxes=boxes,
                pad_square=boxes is not None and self.pad_regions,
                **self._batching(),
                **decoding,
            )

        settings = (self.max_new_tokens, self.num_beams)
        region_key = [list(map(tuple, b)) for b in boxes] if boxes is not None else []
        key = content_key(list(images), region_key, str(settings), self.pad_regions)
        return self._cached("captions", key, compute)


# ---------------------------------------------------------------------------------------------------------- metrics
def blocked_recall(queries: torch.Tensor, items: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int]) -> dict:
    """Recall@k of `queries` [Q, D] against `items` [N, D] with `relevant` [Q, N], QUERY_BLOCK queries at a time."""
    totals = dict.fromkeys(ks, 0.0)
    for start in range(0, queries.shape[0], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        scores = recall_at_k(queries[block] @ items.t(), relevant[block], ks)
        for k in ks:
            totals[k] += scores[k] * queries[block].shape[0]
    return {k: totals[k] / queries.shape[0] for k in ks}


def coco_caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """:func:`coco_caption_scores` as task metrics: each metric that ran, the list of those (`caption_metrics`) and
    why the others did not (`skipped_metrics`, when any)."""
    scores = coco_caption_scores(candidates, references)
    metrics: dict[str, Any] = {k: scores[k] for k in scores["ran"]}
    metrics["caption_metrics"] = scores["ran"]
    if scores["skipped"]:
        metrics["skipped_metrics"] = scores["skipped"]
    return metrics


def coco_caption_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = True, spice: bool = True
) -> dict[str, Any]:
    """pycocoevalcap's PTB tokenisation, BLEU-4, CIDEr-D, METEOR and (when installed) SPICE.

    Returns the scores (fractions, as pycocoevalcap computes them) and `ran`, the metrics that ran; a metric whose
    Java tool cannot start is left out with its reason under `skipped`.
    """
    require("pycocoevalcap", "eval", "Caption metrics (coco-captions, refcocog)")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"need one reference list per candidate; got {len(candidates)} and {len(references)}.")
    # One tokenizer run (a Java start) for references and candidates together.
    texts = {f"g{i}": [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    texts.update({f"r{i}": [{"caption": c}] for i, c in enumerate(candidates)})
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print their statistics
        tokenized = PTBTokenizer().tokenize(texts)
        gts = {i: tokenized[f"g{i}"] for i in range(len(references))}
        # An empty candidate (e.g. only punctuation) would break the scorers' asserts: it scores as ".".
        res = {i: [tokenized[f"r{i}"][0] or "."] for i in range(len(candidates))}
        scores: dict[str, Any] = {"bleu4": float(Bleu(4).compute_score(gts, res)[0][3])}
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
    ran, skipped = ["bleu4", "cider"], {}
    for name, scorer, wanted in (("meteor", _meteor, meteor), ("spice", _spice, spice)):
        if not wanted:
            skipped[name] = "not requested"
            continue
        try:
            value = scorer(gts, res)
        except (OSError, RuntimeError, ValueError, BrokenPipeError) as error:
            skipped[name] = str(error).splitlines()[0] if str(error) else type(error).__name__
            continue
        scores[name] = value
        ran.append(name)
    scores["ran"] = ran
    scores["skipped"] = skipped
    return scores


def _meteor(gts: dict, res: dict) -> float:

    if shutil.which("java") is None:
        raise RuntimeError("METEOR needs Java (not found on PATH)")
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    finally:
        with meteor.lock:
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()


def _spice(gts: dict, res: dict) -> float:

    import pycocoevalcap.spice as spice_package

    lib = Path(spice_package.__file__).parent / "lib"
    if shutil.which("java") is None:
        raise RuntimeError("SPICE needs Java (not found on PATH)")
    if not (lib / "stanford-corenlp-3.6.0.jar").is_file() or not (lib / "stanford-corenlp-3.6.0-models.jar").is_file():
        raise RuntimeError(
            f"SPICE needs Stanford CoreNLP 3.6.0 (stanford-corenlp-3.6.0.jar and -models.jar) in {lib}, a download "
            "this project never starts"
        )
    from pycocoevalcap.spice.spice import Spice

    with contextlib.redirect_stdout(io.StringIO()):
        return float(Spice().compute_score(gts, res)[0])


# ---------------------------------------------------------------------------------------------------------- tasks
def _named(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"{name}/{key}": value for key, value in metrics.items()}


def _directions(
    name: str,
    queries: torch.Tensor,
    items: torch.Tensor,
    relevant: torch.Tensor,
    ks: Sequence[int],
    labels: tuple[str, str],
) -> dict[str, Any]:
    """Recall@k both ways: `labels[0]` ranks `items` for each query, `labels[1]` the reverse."""
    metrics = {}
    for label, (q, i, rel) in zip(labels, ((queries, items, relevant), (items, queries, relevant.t()))):
        for k, value in blocked_recall(q, i, rel, ks).items():
            metrics[f"{name}/{label}/R@{k}"] = value
    return metrics


@dataclass
class RetrievalTask:
    """Images and texts; `text_image[j]` the image of text j, or `relevant` [images, texts] given directly."""

    name: str
    images: list[Any]
    texts: list[str]
    text_image: list[int] | None = None
    ks: tuple[int, ...] = RECALL_KS
    relevant: torch.Tensor | None = None

    def relevance(self) -> torch.Tensor:
        """[images, texts] booleans: which texts are right answers for which images."""
        if self.relevant is not None:
            return self.relevant
        owner = torch.tensor(self.text_image)
        return owner[None, :] == torch.arange(len(self.images))[:, None]

    def run(self, cache: EmbeddingCache) -> dict[str, Any]:
        image_embeds, text_embeds = cache.images(self.images), cache.texts(self.texts)
        metrics: dict[str, Any] = {
            f"{self.name}/num_images": len(self.images),
            f"{self.name}/num_texts": len(self.texts),
        }
        labels = ("image_to_text", "text_to_image")
        return metrics | _directions(self.name, image_embeds, text_embeds, self.relevance(), self.ks, labels)


@dataclass
class ZeroShotTask:
    """Images with class indices; a class scores by its prompts' cosines, reduced by `reduction` ("mean": the
    renormalised mean of the normalised prompt embeddings, as CLIP; "max": the best prompt). After `run`,
    `predictions` holds each image's predicted class index."""

    name: str
    images: list[Any]
    labels: list[int]
    classes: list[str]
    templates: list[str]
    reduction: str = "mean"
    predictions: list[int] = field(default_factory=list)

    def run(self, cache: EmbeddingCache) -> dict[str, Any]:
        prompts = [template.format(c) for c in self.classes for template in self.templates]
        prompt_embeds = cache.texts(prompts).view(len(self.classes), len(self.templates), -1)  # [C, T, D]
        scores = class_scores(cache.images(self.images), prompt_embeds, self.reduction)  # [N, C]
        top = scores.topk(min(5, len(self.classes)), dim=-1).indices  # [N, 5]
        self.predictions = top[:, 0].tolist()
        labels = torch.tensor(self.labels)[:, None]
        return {
            f"{self.name}/top1": float((top[:, :1] == labels).any(dim=1).double().mean()),
            f"{self.name}/top5": float((top == labels).any(dim=1).double().mean()),
            f"{self.name}/num_images": len(self.images),
            f"{self.name}/num_classes": len(self.classes),
        }


@dataclass
class CaptioningTask:
    """Images (or, with `boxes`, their regions, images in order) with their reference captions, scored by `scorer`.
    After `run`, `generated` holds the captions in the order of `references`."""

    name: str
    images: list[Any]
    references: list[list[str]]
    boxes: list[list[list[float]]] | None = None
    scorer: Scorer = coco_caption_metrics
    generated: list[str] = field(default_factory=list)

    def run(self, cache: EmbeddingCache) -> dict[str, Any]:
        self.generated = cache.captions(self.images, self.boxes)
        metrics = _named(self.name, self.scorer(self.generated, self.references))
        metrics[f"{self.name}/num_images"] = len(self.images)
        if self.boxes is not None:
            metrics[f"{self.name}/num_regions"] = len(self.references)
        return metrics


@dataclass
class RegionTask:
    """Referring expressions: regions (image, pixel box) with their sentences; captioning and region<->text R@1.

    `distinct_texts`: rank the distinct sentences (equal texts are one item, relevant to every region they describe)
    instead of every sentence with its own region; `caption`: also caption the regions.
    """

    name: str
    images: list[Any]  # one entry per distinct image
    boxes: list[list[list[float]]]  # per image, its regions' boxes
    sentences: list[list[str]] = field(default_factory=list)  # per region (flat, images in order), its sentences
    scorer: Scorer = coco_caption_metrics
    distinct_texts: bool = False
    caption: bool = True

    def run(self, cache: EmbeddingCache) -> dict[str, Any]:
        metrics: dict[str, Any] = {f"{self.name}/num_regions": len(self.sentences)}
        if self.caption:
            for key, value in self.scorer(cache.captions(self.images, self.boxes), self.sentences).items():
                where = "" if key in ("caption_metrics", "skipped_metrics") else "region_caption/"
                metrics[f"{self.name}/{where}{key}"] = value
        if self.distinct_texts:
            texts = sorted({s for sentences in self.sentences for s in sentences})
            relevant = torch.zeros(len(self.sentences), len(texts), dtype=torch.bool)  # [regions, texts]
            for region, sentences in enumerate(self.sentences):
                relevant[region] = same_text_relevance(sentences, texts).any(dim=0)
        else:
            texts = [s for sentences in self.sentences for s in sentences]
            owner = torch.tensor([r for r, sentences in enumerate(self.sentences) for _ in sentences])
            relevant = torch.arange(len(self.sentences))[:, None] == owner[None, :]  # [regions, texts]
        region_embeds, text_embeds = cache.regions(self.images, self.boxes), cache.texts(texts)
        labels = ("region_to_text", "text_to_region")
        return metrics | _directions(self.name, region_embeds, text_embeds, relevant, (1,), labels)


def run_tasks(tasks: Sequence[Any], cache: EmbeddingCache) -> dict[str, Any]:
    """Every task's metrics in one flat dict (`<task name>/<metric>`), sharing the cache."""
    cache.model.eval()
    metrics: dict[str, Any] = {}
    for task in tqdm(tasks, desc="Benchmarks", disable=not cache.progress or len(tasks) < 2):
        metrics.update(task.run(cache))
    return metrics
