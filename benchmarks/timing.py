"""Interleaved A/B timing: both sides run in the same process, alternating, after warm-up; medians are reported.

Why interleave: on a shared 2-core machine the speed drifts (other jobs, turbo, thermal); timing A then B in two
blocks would put the drift into the ratio. Rotating the order every repetition spreads it over both sides.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover the whole computation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {
    # Wall-clock time: what a user waits for. The default, and the only meaningful clock on a GPU.
    "wall": time.perf_counter,
    # CPU time of this process (all its threads): on a machine shared with other jobs it counts only the work done
    # here, not the time spent waiting for a core. Most robust with `--threads 1` (idle OpenMP threads spin).
    "cpu": time.process_time,
}


def time_block(fn: Callable[[], object], device: torch.device, inner: int, clock: str = "wall") -> float:
    """Seconds per call of `fn`, averaged over `inner` back-to-back calls, on `clock` (see `CLOCKS`)."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (now() - start) / inner


@dataclass
class TimingPlan:
    """How hard to measure: repetitions (medians over these), warm-up calls and the shortest timed block."""

    reps: int = 7
    warmup: int = 2
    min_block_s: float = 0.05
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.reps < 1 or self.warmup < 0 or self.min_block_s < 0:
            raise ValueError(f"`TimingPlan` needs reps >= 1, warmup >= 0, min_block_s >= 0; got {self}.")
        if self.clock not in CLOCKS:
            raise ValueError(f"`TimingPlan.clock` must be one of {sorted(CLOCKS)}; got {self.clock!r}.")


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, plan: TimingPlan) -> dict[str, list[float]]:
    """Time several callables in rotating order; returns seconds per call for each name and repetition.

    All callables share one `inner` count (calls per timed block), chosen so that the slowest block lasts at least
    `plan.min_block_s`: fast calls are then not dominated by timer and scheduler jitter.
    """
    if not fns:
        raise ValueError("`fns` must name at least one callable to time.")
    names = list(fns)
    for _ in range(plan.warmup):
        for name in names:
            fns[name]()
    probe = max(time_block(fns[name], device, 1, plan.clock) for name in names)
    inner = max(1, math.ceil(plan.min_block_s / max(probe, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(plan.reps):
        shift = rep % len(names)
        order = names[shift:] + names[:shift]
        if rep % 2:
            order = order[::-1]
        for name in order:
            samples[name].append(time_block(fns[name], device, inner, plan.clock))
    return samples


def median(values: list[float]) -> float:
    """Median of a non-empty list (the statistic every benchmark reports)."""
    return float(statistics.median(values))
