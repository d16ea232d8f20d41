"""Turn dataset items into MM-GEM training batches.

Items are what `mmgem.data.records.ImageCaptionDataset` yields: `{"image": PIL image, "caption": str, "regions":
[{"box": [x0, y0, x1, y1] in pixels, "caption": str}, ...]}`. Stage 1 uses images and captions (image-text
contrastive + image captioning); stage 2 adds the regions to both objectives (region-text contrastive + region
captioning), as in the paper's second training stage.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from transformers import BatchFeature

from mmgem.data.text import normalize_text

STAGES = (1, 2)


class MMGEMCollator:
    """Data collator for the HF Trainer: a list of dataset items -> the keyword arguments of `MMGEMModel.forward`.

    Args:
        processor: an `MMGEMProcessor`.
        stage: 1 (images and captions) or 2 (regions too).
        max_regions_per_image: with stage 2, keep at most this many regions per image, drawn at random each time
            an image is collated (None keeps all). Region captions are short but numerous; capping them bounds the
            cost of a step and keeps images with many regions from dominating the region loss.
        seed: seed of the region sampling (None: nondeterministic).
        truncation: cut texts longer than the language model's context instead of failing.
        unique_region_texts: with stage 2, leave out a region whose caption already occurs in the batch (as an
            image caption or another region's caption, compared after `normalize_text`). Identical texts are
            false negatives of each other in the contrastive loss: InfoNCE would push apart the embeddings of two
            regions that are both "a small red circle". Short region captions repeat often, so this matters.
    """

    def __init__(
        self,
        processor: Any,
        stage: int = 1,
        max_regions_per_image: int | None = None,
        seed: int | None = None,
        truncation: bool = True,
        unique_region_texts: bool = True,
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
        self._rng = random.Random(seed)

    def _regions(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        regions = list(item.get("regions") or [])
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
        images = [item["image"] for item in items]
        captions = [item["caption"] for item in items]
        if self.stage == 1:
            return self.processor(images=images, text=captions, truncation=self.truncation)
        regions = [self._regions(item) for item in items]
        if self.unique_region_texts:
            regions = self._without_repeated_texts(captions, regions)
        if not any(regions):
            # A stage-2 batch whose images have no regions is still a valid image-text batch.
            return self.processor(images=images, text=captions, truncation=self.truncation)
        return self.processor(
            images=images,
            text=captions,
            boxes=[[region["box"] for region in per_image] for per_image in regions],
            region_text=[[region["caption"] for region in per_image] for per_image in regions],
            truncation=self.truncation,
        )
