"""Turn dataset items into MM-GEM training batches.

Items are what `mmgem.data.records.ImageCaptionDataset` yields: `{"image": PIL image, "caption": str, "regions":
[{"box": [x0, y0, x1, y1] in pixels, "caption": str}, ...]}`. Stage 1 uses images and captions (image-text
contrastive + image captioning); stage 2 adds the regions to both objectives (region-text contrastive + region
captioning), as in the paper's second training stage.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature, TrainerCallback

from mmgem.data.text import normalize_text
from modeling_mmgem.image_loading_mmgem import image_frame_transform

STAGES = (1, 2)


class MMGEMCollator:
    """Data collator for the HF Trainer: a list of dataset items -> the keyword arguments of `MMGEMModel.forward`.

    Args:
        processor: an `MMGEMProcessor`.
        stage: 1 (images and captions) or 2 (regions too).
        max_regions_per_image: with stage 2, keep at most this many regions per image, drawn at random each time
            an image is collated (None keeps all). Region captions are short but numerous; capping them bounds the
            cost of a step and keeps images with many regions from dominating the region loss.
        seed: seed of the region sampling (None: nondeterministic). Each batch draws from its own generator, derived
            from (seed, rank, batch index): the batch index counts every batch the run has collated across epochs,
            DataLoader workers included (worker w of W collates batches w, w + W, ...), so ranks and workers never
            share draws, each epoch draws anew, and a resumed run continues the stream where it stopped instead of
            replaying it (`MMGEMCollatorCallback` keeps rank and position in step with the Trainer).
        rank: this process's rank among the data-parallel ranks (set by `MMGEMCollatorCallback` in training).
        truncation: cut texts longer than the language model's context instead of failing. Texts are first cut to
            :data:`CHARS_PER_TOKEN` characters per token of context (:func:`clip_text`), so that a 12 MB caption
            costs no more to tokenize than one that fills the context: tokenizers read a text whole before they
            truncate it.
        unique_region_texts: with stage 2, leave out a region whose caption already occurs in the batch (as an
            image caption or another region's caption, compared after `normalize_text`). Identical texts are
            false negatives of each other in the contrastive loss: InfoNCE would push apart the embeddings of two
            regions that are both "a small red circle". Short region captions repeat often, so this matters.
            (The model also leaves remaining repeats out of each other's softmax: see `text_keys`.)

    Every batch carries `text_keys`: per text row a hash of the text after `normalize_text`, the form evaluation
    compares texts in, so that rows describing the same thing are not negatives of each other in training.
    """

    def __init__(
        self,
        processor: Any,
        stage: int = 1,
        max_regions_per_image: int | None = None,
        seed: int | None = None,
        truncation: bool = True,
        unique_region_texts: bool = True,
        rank: int = 0,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"`stage` must be 1 (images and captions) or 2 (with regions); got {stage!r}.")
        if max_regions_per_image is not None and (
            not isinstance(max_regions_per_image, int) or max_regions_per_image < 1
        ):
            raise ValueError(f"`max_regions_per_image` must be None or a positive int; got {max_regions_per_image!r}.")
        self.processor = processor
        self.stage = stage
        self.max_regions_per_image = max_regions_per_image
        self.truncation = truncation
        self.unique_region_texts = unique_region_texts
        self.seed = random.SystemRandom().getrandbits(63) if seed is None else seed
        self.rank = rank
        self.start_batch = 0  # index of the first batch of the current DataLoader pass (set by the callback)
        self._calls = 0  # batches collated by this copy (one copy per DataLoader worker) since `start_at`
        self._rng = random.Random(0)

    def _clip(self, text: Any) -> Any:
        if not self.truncation:
            return text
        return clip_text(text, getattr(self.processor.tokenizer, "model_max_length", None))

    def start_at(self, batch_index: int, rank: int | None = None) -> None:
        """Continue the random stream from `batch_index` (batches collated since the run started), e.g. on resume."""
        self.start_batch = batch_index
        self._calls = 0
        if rank is not None:
            self.rank = rank

    def _batch_index(self) -> int:
        """Index of the batch being collated: workers of one DataLoader take batches in turn."""
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        return self.start_batch + self._calls * num_workers + worker_id

    def _regions(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        regions = visible_regions(self.processor.image_processor, item["image"], item.get("regions") or [])
        if self.max_regions_per_image is not None and len(regions) > self.max_regions_per_image:
            # Sample, then restore the original order so that the batch layout stays readable when debugging.
            chosen = sorted(self._rng.sample(range(len(regions)), self.max_regions_per_image))
            regions = [regions[i] for i in chosen]
        return regions

    @staticmethod
    def _without_repeated_texts(captions: Sequence[str], regions: list[list[dict[str, Any]]]) -> list[list[dict]]:
        seen = {normalize_text(caption) for caption in captions}
        kept = []
        for per_image in regions:
            kept.append([])
            for region in per_image:
                text = normalize_text(region["caption"])
                if text not in seen:
                    seen.add(text)
                    kept[-1].append(region)
        return kept

    def __call__(self, items: Sequence[dict[str, Any]]) -> BatchFeature:
        if not items:
            raise ValueError("MMGEMCollator got an empty batch.")
        # Seeded with a string, `random.Random` hashes it with SHA-512: the same stream in every process.
        self._rng = random.Random(f"{self.seed}/{self.rank}/{self._batch_index()}")
        self._calls += 1
        images = [item["image"] for item in items]
        captions = [self._clip(item["caption"]) for item in items]
        if self.stage == 1:
            return self._with_keys(self.processor(images=images, text=captions, truncation=self.truncation), captions)
        regions = [self._regions(item) for item in items]
        if self.unique_region_texts:
            regions = self._without_repeated_texts(captions, regions)
        if not any(regions):
            # A stage-2 batch whose images have no regions is still a valid image-text batch.
            return self._with_keys(self.processor(images=images, text=captions, truncation=self.truncation), captions)
        region_captions = [[self._clip(region["caption"]) for region in per_image] for per_image in regions]
        batch = self.processor(
            images=images,
            text=captions,
            boxes=[[region["box"] for region in per_image] for per_image in regions],
            region_text=region_captions,
            truncation=self.truncation,
        )
        return self._with_keys(batch, captions + [text for per_image in region_captions for text in per_image])

    @staticmethod
    def _with_keys(batch: BatchFeature, texts: Sequence[str]) -> BatchFeature:
        """Add `text_keys` [B (+R)]: the rows' texts (images first, then regions) hashed after `normalize_text`."""
        batch["text_keys"] = torch.tensor([text_key(text) for text in texts], dtype=torch.long)
        return batch


CHARS_PER_TOKEN = 32  # natural text needs 3-6 characters per token; runs such as "=====" at most a few dozen
MAX_CONTEXT_FOR_CLIPPING = 1_000_000  # tokenizers without a real limit report ~1e30 as model_max_length


def clip_text(text: Any, context: int | None) -> Any:
    """`text` cut to `CHARS_PER_TOKEN * context` characters (a non-string, or no usable context: unchanged).

    The tokens of the cut text are those of the whole text up to the context length whenever the kept part averages
    under `CHARS_PER_TOKEN` characters per token, so truncation gives the same batch, only without tokenizing
    megabytes that are thrown away.
    """
    if not isinstance(text, str) or not context or context > MAX_CONTEXT_FOR_CLIPPING:
        return text
    limit = CHARS_PER_TOKEN * int(context)
    return text if len(text) <= limit else text[:limit]


def visible_regions(image_processor: Any, image: Any, regions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The regions whose box keeps a positive area in the model's frame after the image processor's resize and
    center crop. A box lying wholly in the cropped-away part of a non-square image (common in region data such as
    Visual Genome) is never seen by the model: it is left out of training instead of failing the batch."""
    if not regions or not hasattr(image, "size") or not isinstance(image.size, tuple):
        return list(regions)
    width, height = image.size
    sx, sy, ox, oy, fw, fh = image_frame_transform(image_processor, width, height)
    kept = []
    for region in regions:
        x0, y0, x1, y1 = (float(v) for v in region["box"])
        left, right = max(x0 * sx - ox, 0.0), min(x1 * sx - ox, float(fw))
        top, bottom = max(y0 * sy - oy, 0.0), min(y1 * sy - oy, float(fh))
        if right > left and bottom > top:
            kept.append(region)
    return kept


def text_key(text: str) -> int:
    """A non-negative 62-bit key of `text` after `normalize_text`, the same in every process."""
    digest = hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


class MMGEMCollatorCallback(TrainerCallback):
    """Keeps an `MMGEMCollator`'s random stream in step with the Trainer: its rank, and at each epoch's start the
    number of batches already consumed (`global_step * gradient_accumulation_steps`), which after a resume is where
    the interrupted run stopped."""

    def __init__(self, collator: MMGEMCollator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.collator.start_at(state.global_step * args.gradient_accumulation_steps, rank=args.process_index)
