"""LLaVA / ShareGPT4V conversation JSON: a list of `{"id", "image", "conversations": [{"from", "value"}, ...]}`.

The caption is the first `gpt` turn (for the captioning sets, the description the human turn asks for); `image` is
relative to `--image-root` (default: the JSON file's folder). Entries without an image (text-only turns) or without
a `gpt` turn are bad records.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from mmgem.data.formats import IndexedSource, RawSample, SourceOptions, read_json, resolve_image


def first_gpt_turn(entry: dict[str, Any]) -> str | None:
    """The value of the first turn from "gpt" (None if there is none, or "conversations" is not a list)."""
    turns = entry.get("conversations")
    for turn in turns if isinstance(turns, list) else []:
        if isinstance(turn, dict) and turn.get("from") == "gpt":
            return turn.get("value")
    return None


class ConversationSource(IndexedSource):
    """Image + first answer of each conversation."""

    def __init__(self, path: str, options: SourceOptions, entries: list[Any] | None = None) -> None:
        self.name = f"llava:{path}"
        self.entries = read_json(path) if entries is None else entries
        if not isinstance(self.entries, list):
            raise ValueError(f"{path}: expected a JSON list of conversations, got a {type(self.entries).__name__}.")
        self.root = options.data_root(Path(path).resolve().parent)
        self.allow_outside = options.allow_outside_data_root
        self.shuffle = options.shuffle

    def __len__(self) -> int:
        return len(self.entries)

    def sample(self, index: int, rng: random.Random) -> RawSample:
        entry = self.entries[index]
        key = f"{self.name} entry {index}"
        if not isinstance(entry, dict):
            return RawSample(key, None, f"a {type(entry).__name__} (expected a conversation object)")
        if isinstance(entry.get("id"), str | int):
            key += f" (id {str(entry['id'])[:80]})"
        image, problem = resolve_image(self.root, entry.get("image"), self.allow_outside)
        if problem:
            return RawSample(key, None, problem)
        caption = first_gpt_turn(entry)
        if caption is None:
            return RawSample(key, None, 'no "gpt" turn in "conversations" (the caption is the first one)')
        return RawSample(key, {"image": image, "caption": caption})
