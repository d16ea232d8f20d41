"""Benchmark records, the results table and atomic JSON writing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Keys every record of results.json has (tests/test_benchmarks.py checks them).
RECORD_KEYS = ("name", "ours_s", "baseline", "baseline_s", "ratio", "size", "device", "dtype", "batch")


@dataclass
class Record:
    """One comparison: ours vs a baseline on the same weights. `ratio = ours_s / baseline_s`, lower is better.

    `ours_s` / `baseline_s` are medians in seconds, except where `unit` says otherwise (peak RSS in GB).
    `target` is the goal as text (`"<= 1.05"`, `"< 1"`, `"report"`); `met` whether the ratio meets it (None for
    "report").
    """

    name: str
    ours_s: float
    baseline: str
    baseline_s: float
    size: str
    device: str
    dtype: str
    batch: int
    target: str = "report"
    unit: str = "s"
    notes: str = ""
    ratio: float = field(init=False)
    met: bool | None = field(init=False)

    def __post_init__(self) -> None:
        if not self.baseline_s > 0:
            raise ValueError(f"`baseline_s` of {self.name!r} must be positive, got {self.baseline_s!r}.")
        self.ratio = self.ours_s / self.baseline_s
        self.met = target_met(self.ratio, self.target)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_met(ratio: float, target: str) -> bool | None:
    """Whether `ratio` meets a target written as `"<= x"`, `"< x"` or `">= x"` (a recall); None for anything else."""
    parts = target.split()
    if len(parts) != 2 or parts[0] not in ("<=", "<", ">="):
        return None
    bound = float(parts[1])
    return {"<=": ratio <= bound, "<": ratio < bound, ">=": ratio >= bound}[parts[0]]


def _format_value(value: float, unit: str) -> str:
    if unit != "s":
        return f"{value:.3g} {unit}"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} us"


def markdown_table(records: list[Record]) -> str:
    """The results as a Markdown table (printed by run.py and pasted in the README)."""
    lines = [
        "| comparison | baseline | batch | ours | baseline | ratio | target | met |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        lines.append(
            f"| {r.name} | {r.baseline} | {r.batch} | {_format_value(r.ours_s, r.unit)} | "
            f"{_format_value(r.baseline_s, r.unit)} | {r.ratio:.3f} | {r.target} | {met} |"
        )
    return "\n".join(lines)
