"""PNG plots of a training run: loss curves, target metrics against steps and a text-to-image retrieval grid
(matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmgem.data.text import normalize_text
from mmgem.files import atomic_path
from mmgem.optional import require

matplotlib = require("matplotlib", "plots", "Drawing the demo's and experiments' figures")
matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEYS = ("loss_contrastive", "loss_caption")


def _atomic_savefig(figure: Any, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def plot_loss_curves(histories: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike[str]) -> Path:
    """Contrastive and caption losses against the training step, stage after stage.

    Args:
        histories: stage name -> the Trainer's `log_history` (e.g. from `training_log.json`); stages are drawn one
            after the other on a shared step axis, with a dashed line where a stage starts.
        path: the PNG file to write.
    """
    figure, axes = plt.subplots(1, len(LOSS_KEYS), figsize=(5 * len(LOSS_KEYS), 3.6))
    offset = 0
    for index, (stage, history) in enumerate(histories.items()):
        rows = [row for row in history if "loss" in row and "step" in row]
        for axis, key in zip(axes, LOSS_KEYS):
            points = [(offset + row["step"], row[key]) for row in rows if key in row]
            if points:
                axis.plot(*zip(*points), label=stage, color=f"C{index}", marker="." if len(points) < 30 else None)
            if offset:
                axis.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        offset += max((row["step"] for row in rows), default=0)
    for axis, key in zip(axes, LOSS_KEYS):
        axis.set_title(key.replace("_", " "))
        axis.set_xlabel("step")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("MM-GEM training losses")
    return _atomic_savefig(figure, path)


def plot_target_curves(
    points: Sequence[dict[str, Any]], targets: dict[str, float], path: str | os.PathLike[str]
) -> Path:
    """Each target's metric against the training step, with the target as a dashed line.

    Args:
        points: evaluations in step order, each `{"stage": name, "step": steps trained so far, metric: value}`.
        targets: metric key -> the value to reach.
        path: the PNG file to write.
    """
    figure, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 3.2), sharex=True)
    stage_starts = [a["step"] for a, b in zip(points, points[1:]) if a["stage"] != b["stage"]]
    for axis, (key, target) in zip(axes, targets.items()):
        shown = [(p["step"], p[key]) for p in points if p.get(key) is not None]
        if shown:
            axis.plot(*zip(*shown), marker=".", color="C0")
        axis.axhline(target, color="C3", linestyle="--", linewidth=1, label=f"target {target}")
        for start in stage_starts:
            axis.axvline(start, color="grey", linestyle=":", linewidth=0.8)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    figure.suptitle("MM-GEM demo: target metrics during training (dotted: stage 2 starts)")
    return _atomic_savefig(figure, path)


def plot_retrieval_grid(
    images: Sequence[Any],
    captions: Sequence[str],
    similarity: Any,
    path: str | os.PathLike[str],
    num_queries: int = 5,
    top_k: int = 4,
) -> Path:
    """For a few captions (rows), the `top_k` images the model retrieves, framed green when their caption matches.

    Args:
        images: the gallery images (PIL).
        captions: caption i describes image i; the queries are the first `num_queries` distinct captions.
        similarity: `[num_images, num_captions]` image-caption similarities (e.g. `EvaluationResult.similarity`).
        path: the PNG file to write.
    """
    queries: list[int] = []
    seen: set[str] = set()
    for index, caption in enumerate(captions):
        if normalize_text(caption) not in seen:
            seen.add(normalize_text(caption))
            queries.append(index)
        if len(queries) == num_queries:
            break
    top_k = min(top_k, len(images))
    figure, axes = plt.subplots(len(queries), top_k, figsize=(2.0 * top_k, 2.3 * len(queries)), squeeze=False)
    for row, query in enumerate(queries):
        ranked = similarity[:, query].argsort(descending=True)[:top_k].tolist()
        for column, image_index in enumerate(ranked):
            axis = axes[row][column]
            axis.imshow(images[image_index])
            hit = normalize_text(captions[image_index]) == normalize_text(captions[query])
            for spine in axis.spines.values():
                spine.set_edgecolor("tab:green" if hit else "tab:red")
                spine.set_linewidth(4)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].set_ylabel(_wrap(captions[query]), rotation=0, ha="right", va="center", fontsize=8)
    figure.suptitle("Text -> image retrieval (green: correct)")
    return _atomic_savefig(figure, path)


def _wrap(text: str, width: int = 28) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
