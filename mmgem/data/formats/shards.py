"""webdataset shards in the layout img2dataset writes (also GRIT's): `00000.tar`, `00001.tar`, ...

Inside a shard, the files of a sample share a key without dots: `<key>.jpg` (or `.jpeg`, `.png`, `.webp`), `<key>.txt`
(the caption) and `<key>.json` (img2dataset's metadata: `caption`, `url`, `width`, `height`, ...; GRIT adds
`noun_chunks` and `ref_exps`, see `mmgem.data.formats.grit`; a `regions` list in the project's format is read too).
The caption is the `.txt` file, else the JSON's `caption`.

Shard URLs use brace expansion (`shards/{00000..00099}.tar`), as webdataset reads them. Opening URLs and grouping
files into samples are webdataset's; the tar members are read here (:func:`tar_members`), so that a member larger
than `MMGEM_MAX_IMAGE_BYTES` (64 MiB) is refused from its tar header before a byte of it is held in memory (a
597 kB .tar.gz can hold a 600 MB member). Its sample is then a bad record (`--data-on-error`). The `.json` metadata
is decoded by `mmgem.data.safe_json` (depth, integer and UTF-8 limits). Shards are split between ranks and
DataLoader workers (each reader opens only its own shards, so a run needs at least as many shards as readers), or,
with `resampled`, every reader draws shards at random with replacement (an endless stream, the usual choice for
large web data).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Iterator
from itertools import islice
from typing import Any

from mmgem.data.formats import IMAGE_EXTENSIONS, RawSample, Shard, Source, SourceOptions
from mmgem.data.formats.grit import grit_regions
from mmgem.data.safe_json import JSONProblem, parse_json
from mmgem.optional import require
from modeling_mmgem.image_loading_mmgem import input_limit


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
        stages.append(_tar_samples(self._handler))
        if self.options.shuffle and self.options.shuffle_buffer > 1:
            buffer = self.options.shuffle_buffer
            stages.append(wds.shuffle(buffer, initial=buffer, seed=seed + epoch + 7919 * shard.index))
        for sample in wds.DataPipeline(*stages):
            yield _raw_sample(sample)


class OversizedMember:
    """Stands for a tar member that was not read because its header says it is over the byte cap."""

    def __init__(self, name: str, size: int, limit: int) -> None:
        self.name, self.size, self.limit = name, size, limit

    def problem(self) -> str:
        return (
            f"tar member {self.name} is {self.size:,} bytes, over the {self.limit:,} allowed "
            "(MMGEM_MAX_IMAGE_BYTES); it was not read"
        )


def member_byte_limit() -> int:
    """The largest tar member read (`MMGEM_MAX_IMAGE_BYTES`, the cap on one encoded image)."""
    return int(input_limit("max_image_bytes"))


def tar_members(fileobj: Any, limit: int | None = None) -> Iterator[tuple[str, bytes | OversizedMember]]:
    """(name, content) of the regular files of a tar stream (plain or compressed, read sequentially); a member
    whose header gives a size over `limit` (default :func:`member_byte_limit`) is skipped unread and yields an
    :class:`OversizedMember` instead of its bytes. Memory stays within one member of at most `limit` bytes."""
    limit = member_byte_limit() if limit is None else limit
    with tarfile.open(fileobj=_gunzipped(fileobj), mode="r|*") as stream:
        for member in stream:
            if not member.isreg():
                continue
            if member.size > limit:
                yield member.name, OversizedMember(member.name, member.size, limit)
                continue  # the stream skips the member's blocks without keeping them
            handle = stream.extractfile(member)
            yield member.name, handle.read() if handle is not None else b""
            stream.members = []  # tarfile keeps every header of a stream otherwise


class _Prefixed(io.RawIOBase):
    """A read-only stream: `head` (bytes already read from `stream`), then the rest of `stream`."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            count = min(len(buffer), len(self.head))
            buffer[:count], self.head = self.head[:count], self.head[count:]
            return count
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _gunzipped(fileobj: Any) -> Any:
    """`fileobj`, decompressed by `gzip` when it starts with the gzip magic. tarfile's own stream decompression
    keeps every burst zlib hands out and copies it at each 10 kB read: skipping a member of zeros is then quadratic
    (a 48 MB member: most of a minute) and holds ~16 MB; `GzipFile` decompresses only what is read."""
    head = fileobj.read(2)
    stream = io.BufferedReader(_Prefixed(head, fileobj), buffer_size=1 << 16)
    return gzip.GzipFile(fileobj=stream, mode="rb") if head == b"\x1f\x8b" else stream


def _tar_samples(handler: Any):
    """A webdataset stage: opened shard URLs -> samples grouped by key, members read by :func:`tar_members`."""
    import webdataset as wds

    def expand(sources: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for source in sources:
            try:
                for name, data in tar_members(source["stream"]):
                    if name.startswith("__") or "/__" in name:  # webdataset's metadata members
                        continue
                    yield {"fname": name, "data": data, "__url__": source["url"]}
                yield {}  # end of shard: samples of two shards are never merged
            except Exception as error:  # a damaged shard: the handler re-raises ("fail") or goes on
                if not handler(error):
                    break
            finally:
                close = getattr(source.get("stream"), "close", None)
                if close is not None:
                    close()

    def stage(urls: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        streams = wds.tariterators.url_opener(urls, handler=handler)
        return wds.tariterators.group_by_keys(expand(streams), handler=handler)

    return stage


def _split(shard: Shard):
    """A webdataset stage keeping this reader's shards (every `count`-th URL from `index`)."""

    def split(urls: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from islice(urls, shard.index, None, shard.count)

    return split


def _raw_sample(sample: dict[str, Any]) -> RawSample:
    key = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    oversized = [v for v in sample.values() if isinstance(v, OversizedMember)]
    if oversized:
        return RawSample(key, None, oversized[0].problem())
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image is None:
        present = sorted(k for k in sample if not k.startswith("__"))
        return RawSample(key, None, f"no image file (expected one of {IMAGE_EXTENSIONS}; the sample has {present})")
    metadata: dict[str, Any] = {}
    if "json" in sample:
        try:
            metadata = parse_json(sample["json"])
        except JSONProblem as error:
            return RawSample(key, None, f".json: {error}")
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
