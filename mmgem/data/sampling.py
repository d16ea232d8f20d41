"""Training order with hard negatives: batches made of blocks of records that share a group key.

In-batch negatives drawn at random are mostly easy: two random scenes of the synthetic data almost always differ in
colour, so InfoNCE learns colours and puts little pressure on shapes. Grouping records whose key is equal (for the
synthetic data, `colour_group`: scenes with the same colours, differing in shape or size) into the same batch makes
the negatives that matter appear in every softmax. Rows that end up identical (two "a small red circle") are not
negatives of each other: the model leaves repeated texts out of each other's softmax (`text_keys`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler


class HardNegativeSampler(Sampler[int]):
    """A map-style dataset's indices, one epoch at a time, in blocks of `group_size` indices of one group.

    Each epoch shuffles every group, cuts it into blocks of `group_size`, pools the remainders of all groups into
    mixed blocks, and shuffles the blocks; the one block shorter than `group_size` (if any) comes last, so every
    batch of `batch_size` consecutive indices (a multiple of `group_size`) is `batch_size // group_size` whole
    blocks. Every index occurs exactly once per epoch. The order is a function of (seed, epoch) only, the same on
    every rank, so accelerate's batch sharding gives each rank whole batches, and a resumed run sees the order the
    interrupted one saw (the Trainer calls `set_epoch`).

    Args:
        groups: per dataset index, its group key (any hashable value).
        batch_size: the per-device batch size; must be a multiple of `group_size`.
        group_size: records of one group per block (>= 2).
        seed: seed of the order.
    """

    def __init__(self, groups: Sequence[Hashable], batch_size: int, group_size: int, seed: int = 0) -> None:
        check_group_size(batch_size, group_size)
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0
        members: dict[Hashable, list[int]] = {}
        for index, key in enumerate(groups):
            members.setdefault(key, []).append(index)
        self._members = list(members.values())  # in first-occurrence order: deterministic
        self._length = len(groups)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s order on the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        size = self.group_size
        blocks: list[list[int]] = []
        remainders: list[int] = []
        for members in self._members:
            shuffled = rng.sample(members, len(members))
            whole = len(shuffled) - len(shuffled) % size
            blocks.extend(shuffled[start : start + size] for start in range(0, whole, size))
            remainders.extend(shuffled[whole:])
        rng.shuffle(remainders)
        mixed = [remainders[start : start + size] for start in range(0, len(remainders), size)]
        short = mixed.pop() if mixed and len(mixed[-1]) < size else []
        blocks.extend(mixed)
        rng.shuffle(blocks)
        for block in [*blocks, short]:
            yield from block


def check_group_size(batch_size: int, group_size: int) -> None:
    """Raise a ValueError naming the option unless `group_size` is an int >= 2 dividing the per-device batch size."""
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"`hard_negative_group_size` must be an int >= 2; got {group_size!r}.")
    if batch_size % group_size:
        raise ValueError(
            f"`per_device_train_batch_size` ({batch_size}) must be a multiple of `hard_negative_group_size` "
            f"({group_size}), so that batches hold whole groups."
        )


def group_key(value: Any) -> Hashable:
    """A hashable key of a record field's JSON value (strings and numbers as they are, lists and dicts as JSON)."""
    if isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True)


def record_groups(records: Sequence[Any], field: str) -> list[Hashable]:
    """Per record, the group key of its metadata field `field` (a top-level field of the record in the data file);
    a ValueError names the argument and the first records without it."""
    missing = [r.line_number for r in records if r.metadata.get(field) is None]
    if missing:
        raise ValueError(
            f"`hard_negative_field` {field!r}: {len(missing)} of {len(records)} records have no such field "
            f"(lines {missing[:10]}); every training record needs one."
        )
    return [group_key(r.metadata[field]) for r in records]


__all__ = ["HardNegativeSampler", "check_group_size", "group_key", "record_groups"]
