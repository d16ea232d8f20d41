"""webdataset shards in the layout img2dataset writes (also GRIT's): `00000.tar`, `00001.tar`, ...

Inside a shard, the files of a sample share a key without dots: `<key>.jpg` (or `.jpeg`, `.png`, `.webp`), `<key>.txt`
(the caption) and `<key>.json` (img2dataset's metadata: `caption`, `url`, `width`, `height`, ...; GRIT adds
`noun_chunks` and `ref_exps`, see `mmgem.data.formats.grit`; a `regions` list in the project's format is read too).
The caption is the `.txt` file, else the JSON's `caption`.

Shard URLs use brace expansion (`shards/{00000..00099}.tar`), as webdataset reads them. Reading, tar parsing and
grouping are webdataset's; shards are split between ranks and DataLoader workers (each reader opens only its own
shards, so a run needs at least as many shards as readers), or, with `resampled`, every reader draws shards at
random with replacement (an endless stream, the usual choice for large web data).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from typing import Any

from mmgem.data.formats import IMAGE_EXTENSIONS, RawSample, Shard, Source, SourceOptions
from mmgem.data.formats.grit import grit_regions
from mmgem.optional import require


class WebDatasetSource(Source):
    """Samples of webdataset shards (`urls`: a brace pattern or a list of paths/URLs)."""

    def __init__(self, urls: str | list[str], options: SourceOptions, on_error: str = "fail") -> None:
        wds = require("webdataset", "data", "Training from webdataset shards")

        self.urls = list(wds.shardlists.expand_urls(urls)) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError(f"webdataset source {urls!r} names no shard.")
        self.name = f"webdataset:{urls}"
        self.options = options
        self.on_error = on_error

    def _handler(self, error: Exception) -> bool:
        """A damaged shard: re-raised with "fail", otherwise webdataset warns and continues with the next."""
        import webdataset as wds

        if self.on_error == "fail":
            raise ValueError(f"{self.name}: cannot read a shard ({error}).") from error
        return wds.warn_and_continue(error)

    def samples(self, shard: Shard, epoch: int, seed: int) -> Iterator[RawSample]:
        import webdataset as wds

        if self.options.resampled:
            # A distinct, reproducible shard sequence per reader and epoch.
            shards = wds.ResampledShards(
                self.urls, seed=seed + epoch, worker_seed=lambda: shard.index, deterministic=True
            )
            stages = [shards]
        else:
            stages = [wds.SimpleShardList(self.urls), _split(shard)]
            if self.options.shuffle:
                stages.append(wds.shuffle(len(self.urls), initial=len(self.urls), seed=seed + epoch))
        stages.append(wds.tarfile_to_samples(handler=self._handler))
        if self.options.shuffle and self.options.shuffle_buffer > 1:
            buffer = self.options.shuffle_buffer
            stages.append(wds.shuffle(buffer, initial=buffer, seed=seed + epoch + 7919 * shard.index))
        for sample in wds.DataPipeline(*stages):
            yield _raw_sample(sample)


def _split(shard: Shard):
    """A webdataset stage keeping this reader's shards (every `count`-th URL from `index`)."""

    def split(urls: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from islice(urls, shard.index, None, shard.count)

    return split


def _raw_sample(sample: dict[str, Any]) -> RawSample:
    key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        return RawSample(key, None, f"no image file (expected one of {IMAGE_EXTENSIONS}; the sample has {present})")
    metadata: dict[str, Any] = {}
    if "json" in sample:
        try:
            metadata = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return RawSample(key, None, f"malformed .json ({error})")
        if not isinstance(metadata, dict):
            return RawSample(key, None, f".json holds a {type(metadata).__name__} (expected an object)")
    caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else metadata.get("caption")
    raw: dict[str, Any] = {"image": image, "caption": caption.strip() if isinstance(caption, str) else caption}
    if "long_caption" in metadata:
        raw["long_caption"] = metadata["long_caption"]
    if "noun_chunks" in metadata:
        regions, problem = grit_regions(caption, metadata)
        if problem:
            return RawSample(key, None, problem)
        raw["regions"] = regions
    elif "regions" in metadata:
        raw["regions"] = metadata["regions"]
    return RawSample(key, raw)
