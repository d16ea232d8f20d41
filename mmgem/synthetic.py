"""A deterministic synthetic image-caption dataset: flat coloured shapes on pale backgrounds.

This is the project's own data for the demo, the tests and the experiments. Every property of every object is
known exactly, so captions, long descriptions and region boxes are exact, and the held-out split tests
compositional generalisation: some (colour, shape) pairs never occur in training and every test image holds one.

Layout written by :func:`generate_dataset`::

    output_dir/
        train.jsonl  val.jsonl  test.jsonl   one JSON record per line (read them with `mmgem.data.records`)
        labels.json                          class names for zero-shot classification and the held-out pairs
        images/train_00000.png ...           RGB PNGs; records name them relative to the .jsonl file

A record::

    {"image": "images/train_00000.png",
     "caption": "a small red circle and a large blue star",
     "long_caption": "<generic preamble of >= 85 words> There are two shapes ... The background ...",
     "regions": [{"box": [x0, y0, x1, y1], "caption": "a small red circle"}, ...],
     "objects": [{"shape": "circle", "colour": "red", "size": "small", "position": "top left"}, ...],
     "background": {"kind": "gradient", "colours": ["mint", "peach"], "direction": "vertical"},
     "colour_group": "blue red"}

`colour_group` (the object colours, sorted) groups the scenes that are hard to tell apart by colour alone: training
with `--hard_negative_field colour_group` fills batches with such groups (`mmgem.data.sampling`).

Boxes are integer pixels with exclusive right/bottom edges (as `PIL.Image.getbbox`): `x1 - x0` is the width and
`0 <= x0 < x1 <= width`. They are the tight bounding boxes of the drawn pixels. Objects, regions and the short
caption all list the objects left to right (by box centre, ties top to bottom), so captions are learnable. With
`min_horizontal_gap`, box centres are at least that many pixels apart horizontally, so that order can be seen.

Run it as `python -m mmgem.synthetic --output-dir data/shapes`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mmgem.cli import command_parser
from mmgem.errors import checking_user_input

if TYPE_CHECKING:
    from mmgem.data.records import ImageRecord

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

# Saturated or dark colours: each has a channel <= 55, while every background pixel has all channels >= 200, so an
# object can never be mistaken for background (by a model or by the tests). Pairwise RGB distances are >= 95.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 120, 0),
    "yellow": (235, 215, 0),
    "green": (35, 155, 55),
    "cyan": (20, 175, 195),
    "blue": (35, 70, 215),
    "purple": (135, 45, 175),
    "black": (25, 25, 25),
}

# Pale background colours, named with words that are not object colour names so texts stay unambiguous.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "ivory": (250, 247, 228),
    "cream": (246, 236, 215),
    "mint": (220, 245, 228),
    "lavender": (233, 225, 248),
    "peach": (252, 228, 214),
    "silver": (226, 226, 226),
    "frost": (222, 236, 250),
}
BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "noise")
NOISE_AMPLITUDE = 12  # keeps noisy backgrounds >= 200 per channel
SIZES: tuple[str, ...] = ("small", "large")
# Side of a shape's square frame as a fraction of the image side.
SIZE_FRACTIONS: dict[str, tuple[float, float]] = {"small": (0.17, 0.24), "large": (0.32, 0.42)}
SPLITS: tuple[str, ...] = ("train", "val", "test")
MIN_IMAGE_SIZE = 32
MAX_OBJECTS = 6
# Minimum number of words of the generic preamble of long captions: with punctuation that is > 77 BPE tokens, so
# a CLIP text tower (77 tokens) sees none of the details that tell images apart.
PREAMBLE_MIN_WORDS = 85

_GAP = 2  # pixels between the frames of two objects: no overlap, and boxes stay separable
_MARGIN = 1  # pixels between a frame and the image border
_PLACEMENT_TRIES = 200
_LAYOUT_TRIES = 50
_DUPLICATE_TRIES = 20
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_HELDOUT_STREAM = 7_000
_PLAN_STREAM = 8_000

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
_POSITION_PHRASES = {
    "top left": "in the top left corner",
    "top": "near the top edge",
    "top right": "in the top right corner",
    "left": "on the left side",
    "centre": "in the centre",
    "right": "on the right side",
    "bottom left": "in the bottom left corner",
    "bottom": "near the bottom edge",
    "bottom right": "in the bottom right corner",
}
# Generic sentences: no colour, shape, size, position or number words, so the preamble tells no images apart.
_PREAMBLE_SENTENCES = (
    "This picture is a simple synthetic scene that was generated by a computer program for testing how well a model "
    "can match pictures with long written descriptions.",
    "Every shape in the scene is drawn flat, filled with a single solid colour, and has no outline, no shading, no "
    "shadow and no texture of its own.",
    "The shapes were placed at random positions on the canvas, and the program made sure that none of them touch "
    "or overlap each other.",
    "Nothing in the picture is a photograph; there are no people, no animals, no text, no numbers and no real "
    "objects of any kind.",
    "The canvas is quite low in resolution, so the edges of the shapes look slightly jagged when the picture is "
    "viewed up close.",
    "A careful reader should pay attention to the details given further below, because many pictures of this kind "
    "share the same general description.",
    "The shapes can differ from each other in their form, in their colour, in how big they are and in where they "
    "sit within the frame.",
    "Such pictures are often used as toy data, because every property of every shape is known exactly and can be "
    "checked automatically.",
    "The lighting is perfectly even everywhere, and the view is straight on, as if looking at a sheet of paper lying "
    "on a desk.",
)
_PREAMBLE_CLOSING = (
    "The description that follows talks about each shape in turn, going through them in order, and then "
    "describes what lies behind them."
)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its attributes and its tight pixel box (x1, y1 exclusive)."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]


def class_name(colour: str, shape: str) -> str:
    """Zero-shot class name of a (colour, shape) pair, e.g. "red circle"."""
    return f"{colour} {shape}"


def all_pairs() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, colours in `COLOURS` order then shapes in `SHAPES` order."""
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def position_of(box: Sequence[float], image_size: int) -> str:
    """Coarse position of a box from its centre on a 3x3 grid: "top left", "top", ..., "centre", ..., "bottom right"."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    column = ("left", "", "right")[min(int(cx * 3 / image_size), 2)]
    row = ("top", "", "bottom")[min(int(cy * 3 / image_size), 2)]
    return " ".join(part for part in (row, column) if part) or "centre"


def choose_heldout_pairs(seed: int, num_pairs: int = 4) -> list[tuple[str, str]]:
    """The (colour, shape) pairs kept out of training for a seed.

    The pairs use distinct colours and distinct shapes, so every colour and every shape still occurs in training
    (with other partners): the held-out split then measures composition, not unseen words.
    """
    limit = min(len(COLOURS), len(SHAPES))
    if not 0 <= num_pairs <= limit:
        raise ValueError(f"num_pairs must be in [0, {limit}], got {num_pairs}.")
    rng = np.random.default_rng([seed, _HELDOUT_STREAM])
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    shapes = [str(s) for s in rng.permutation(list(SHAPES))]
    return sorted(zip(colours[:num_pairs], shapes[:num_pairs], strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def _background(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A pale background as a uint8 [H, W, 3] array and its description."""
    names = list(BACKGROUND_COLOURS)
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    first = names[int(rng.integers(len(names)))]
    base = np.array(BACKGROUND_COLOURS[first], dtype=np.float32)
    canvas = np.broadcast_to(base, (image_size, image_size, 3)).astype(np.float32)
    description: dict[str, Any] = {"kind": kind, "colours": [first]}
    if kind == "gradient":
        second = names[(names.index(first) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
        direction = ("vertical", "horizontal")[int(rng.integers(2))]
        ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
        ramp = ramp[:, None, None] if direction == "vertical" else ramp[None, :, None]
        canvas = base + ramp * (np.array(BACKGROUND_COLOURS[second], dtype=np.float32) - base)
        canvas = np.broadcast_to(canvas, (image_size, image_size, 3))
        description.update(colours=[first, second], direction=direction)
    elif kind == "noise":
        # Grey grain (same offset on all channels) keeps the hue pale and the texture light.
        grain = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(image_size, image_size, 1))
        canvas = canvas + grain.astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), description


def _shape_mask(shape: str, x: int, y: int, side: int, image_size: int) -> Image.Image:
    """An "L" mask (255 inside) of `shape` drawn in the square frame [x, x + side) x [y, y + side)."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x + side - 1, y + side - 1
    cx, cy = x + (side - 1) / 2, y + (side - 1) / 2
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x1, y1), (x, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=255)
    elif shape == "cross":
        half = max(side / 6, 1.0)  # arms one third of the side thick
        draw.rectangle([x, cy - half, x1, cy + half], fill=255)
        draw.rectangle([cx - half, y, cx + half, y1], fill=255)
    elif shape == "star":
        outer = (side - 1) / 2
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else outer * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    return mask


def _frames_apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two square frames (x, y, side) are at least `_GAP` pixels apart on some axis."""
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax + aside + _GAP <= bx or bx + bside + _GAP <= ax or ay + aside + _GAP <= by or by + bside + _GAP <= ay


def _place_frames(rng: np.random.Generator, sides: Sequence[int], image_size: int) -> list[tuple[int, int, int]] | None:
    """Reject-sample non-overlapping positions for frames of the given sides; None when one does not fit."""
    placed: list[tuple[int, int, int]] = []
    for side in sides:
        high = image_size - _MARGIN - side
        for _ in range(_PLACEMENT_TRIES):
            frame = (int(rng.integers(_MARGIN, high + 1)), int(rng.integers(_MARGIN, high + 1)), side)
            if all(_frames_apart(frame, other) for other in placed):
                placed.append(frame)
                break
        else:
            return None
    return placed


def _layout(
    rng: np.random.Generator,
    sizes: Sequence[str],
    image_size: int,
    size_fractions: dict[str, Sequence[float]] = SIZE_FRACTIONS,
) -> list[tuple[int, int, int]]:
    """Frames (x, y, side) for objects of the given size names, re-drawing sides when a layout does not fit."""
    for _ in range(_LAYOUT_TRIES):
        sides = [max(4, round(float(rng.uniform(*size_fractions[size])) * image_size)) for size in sizes]
        frames = _place_frames(rng, sides, image_size)
        if frames is not None:
            return frames
    raise RuntimeError(f"Could not place {len(sizes)} objects in a {image_size}px image; use a larger image_size.")


def _pick_pairs(
    rng: np.random.Generator, count: int, allowed: Sequence[tuple[str, str]], required: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """`count` distinct (colour, shape) pairs from `allowed`, the first one from `required` when it is given."""
    chosen: list[tuple[str, str]] = []
    if required:
        chosen.append(required[int(rng.integers(len(required)))])
    while len(chosen) < count:
        pair = allowed[int(rng.integers(len(allowed)))]
        if pair not in chosen:  # distinct pairs keep captions and region queries unambiguous
            chosen.append(pair)
    return chosen


def _draw_layout(
    rng: np.random.Generator,
    shapes: Sequence[str],
    sizes: Sequence[str],
    image_size: int,
    size_fractions: dict[str, Sequence[float]],
    min_horizontal_gap: int,
) -> list[Image.Image]:
    """The shape masks of a layout whose tight-box centres are `min_horizontal_gap` pixels apart
    horizontally, re-drawing the layout until they are. With a gap of 0 the first layout is kept, so the scene is
    the one drawn without the option."""
    for _ in range(_LAYOUT_TRIES):
        frames = _layout(rng, sizes, image_size, size_fractions)
        masks = [_shape_mask(shape, x, y, side, image_size) for shape, (x, y, side) in zip(shapes, frames, strict=True)]
        centres = sorted((box[0] + box[2]) / 2 for box in (mask.getbbox() for mask in masks))
        if all(right - left >= min_horizontal_gap for left, right in zip(centres, centres[1:])):
            return masks
    raise RuntimeError(
        f"Could not place {len(shapes)} objects {min_horizontal_gap}px apart horizontally in a {image_size}px "
        "image; use a smaller min_horizontal_gap or a larger image_size."
    )


def render_scene(
    rng: np.random.Generator,
    image_size: int,
    num_objects: int,
    allowed_pairs: Sequence[tuple[str, str]],
    required_pairs: Sequence[tuple[str, str]] = (),
    size_fractions: dict[str, Sequence[float]] = SIZE_FRACTIONS,
    min_horizontal_gap: int = 0,
) -> tuple[Image.Image, list[SceneObject], dict[str, Any]]:
    """Draw one scene.

    Args:
        rng: the source of randomness (the scene is a pure function of its state).
        image_size: side of the square image in pixels.
        num_objects: how many objects to draw.
        allowed_pairs: the (colour, shape) pairs objects may take.
        required_pairs: when non-empty, one object takes one of these pairs.
        size_fractions: per size name, the range of a shape's frame side as a fraction of the image side.
        min_horizontal_gap: least horizontal distance in pixels between two objects' box centres.

    Returns:
        The RGB image, its objects sorted left to right (ties top to bottom) with tight boxes, and the background
        description.
    """
    canvas, background = _background(rng, image_size)
    pairs = _pick_pairs(rng, num_objects, allowed_pairs, required_pairs)
    sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in pairs]
    shapes = [shape for _, shape in pairs]
    masks = _draw_layout(rng, shapes, sizes, image_size, size_fractions, min_horizontal_gap)
    objects = []
    for (colour, shape), size, mask in zip(pairs, sizes, masks, strict=True):
        canvas[np.asarray(mask) > 0] = COLOURS[colour]
        # The box comes from the drawn pixels, so it is tight whatever the shape's outline.
        box = tuple(int(v) for v in mask.getbbox())
        objects.append(SceneObject(shape=shape, colour=colour, size=size, box=box))
    objects.sort(key=lambda o: ((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2))
    return Image.fromarray(canvas, "RGB"), objects, background


# ---------------------------------------------------------------------------------------------------------------------
# Texts


def region_caption(obj: SceneObject) -> str:
    """Caption of one object's region, e.g. "a small red circle"."""
    return f"a {obj.size} {obj.colour} {obj.shape}"


def colour_group(objects: Sequence[SceneObject]) -> str:
    """The scene's object colours, sorted, e.g. "blue red red": scenes of one group share their colours and differ
    in shape, size or place, the hard negatives of each other (`mmgem train --hard_negative_field colour_group`)."""
    return " ".join(sorted(o.colour for o in objects))


def _join(phrases: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def short_caption(objects: Sequence[SceneObject]) -> str:
    """Caption of a scene: its region captions left to right, e.g. "a small red circle and a large blue star"."""
    return _join([region_caption(o) for o in objects])


def _background_sentence(background: dict[str, Any]) -> str:
    colours = background["colours"]
    if background["kind"] == "gradient":
        start, end = ("top", "bottom") if background["direction"] == "vertical" else ("left", "right")
        return (
            f"The background behind the shapes is a smooth gradient that goes from {colours[0]} at the {start} "
            f"to {colours[1]} at the {end}."
        )
    if background["kind"] == "noise":
        return f"The background behind the shapes is {colours[0]} with a light, grainy noise texture."
    return f"The background behind the shapes is a plain, even {colours[0]} colour."


def _preamble(rng: np.random.Generator, min_words: int) -> list[str]:
    """Generic sentences in a random order until at least `min_words` words, then a fixed closing sentence."""
    sentences: list[str] = []
    words = len(_PREAMBLE_CLOSING.split())
    for index in rng.permutation(len(_PREAMBLE_SENTENCES)):
        if words >= min_words:
            break
        sentences.append(_PREAMBLE_SENTENCES[int(index)])
        words += len(sentences[-1].split())
    return [*sentences, _PREAMBLE_CLOSING]


def long_caption(
    rng: np.random.Generator,
    objects: Sequence[SceneObject],
    background: dict[str, Any],
    image_size: int,
    preamble_min_words: int = PREAMBLE_MIN_WORDS,
) -> str:
    """A long description whose discriminative details all come after a generic preamble.

    Order: preamble (>= `preamble_min_words` words, nothing specific to the image), the object count, one pair of
    sentences per object (left to right: shape, then size, colour and position) and the background last.
    """
    count = len(objects)
    if count == 1:
        parts = ["There is only one shape in the picture."]
    else:
        parts = [f"There are {_NUMBER_WORDS[count]} shapes in the picture, listed here from left to right."]
    for ordinal, obj in zip(_ORDINALS, objects, strict=False):
        where = _POSITION_PHRASES[position_of(obj.box, image_size)]
        parts.append(f"The {ordinal} shape is a {obj.shape}.")
        parts.append(f"It is {obj.size} and {obj.colour}, and it is placed {where} of the picture.")
    parts.append(_background_sentence(background))
    return " ".join([*_preamble(rng, preamble_min_words), *parts])


# ---------------------------------------------------------------------------------------------------------------------
# Dataset


def _split_plan(seed: int, split: str, count: int, single_object_fraction: float) -> np.ndarray:
    """Which images of a split hold exactly one object: an exact share, at positions drawn by seed."""
    singles = np.zeros(count, dtype=bool)
    rng = np.random.default_rng([seed, _PLAN_STREAM, _SPLIT_CODES[split]])
    singles[rng.permutation(count)[: round(single_object_fraction * count)]] = True
    return singles


def _make_record(
    seed: int,
    split: str,
    index: int,
    attempt: int,
    single: bool,
    image_size: int,
    max_objects: int,
    pairs: tuple[Sequence[tuple[str, str]], Sequence[tuple[str, str]]],
    preamble_min_words: int,
    size_fractions: dict[str, Sequence[float]] = SIZE_FRACTIONS,
    min_horizontal_gap: int = 0,
) -> tuple[Image.Image, dict[str, Any]]:
    """Image `index` of `split` and its record (without the "image" path): a pure function of its arguments."""
    # One stream per image: an image does not depend on how many others are generated.
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index, attempt])
    allowed, required = pairs
    num_objects = 1 if single or max_objects == 1 else int(rng.integers(2, max_objects + 1))
    image, objects, background = render_scene(
        rng, image_size, num_objects, allowed, required, size_fractions, min_horizontal_gap
    )
    record = {
        "caption": short_caption(objects),
        "long_caption": long_caption(rng, objects, background, image_size, preamble_min_words),
        "regions": [{"box": list(o.box), "caption": region_caption(o)} for o in objects],
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "position": position_of(o.box, image_size)}
            for o in objects
        ],
        "background": background,
        "colour_group": colour_group(objects),
    }
    return image, record


def _check_arguments(counts: dict[str, int], image_size: int, seed: int, max_objects: int, fraction: float) -> None:
    for split, count in counts.items():
        if count < 0:
            raise ValueError(f"num_{split} must be >= 0, got {count}.")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}.")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"single_object_fraction must be in [0, 1], got {fraction}.")


def _check_horizontal_gap(gap: int, image_size: int, max_objects: int) -> None:
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"min_horizontal_gap must be a whole number of pixels >= 0, got {gap!r}.")
    # The centres of max_objects objects `gap` apart span (max_objects - 1) * gap pixels inside the image.
    if (max_objects - 1) * gap >= image_size:
        raise ValueError(
            f"min_horizontal_gap={gap} cannot fit {max_objects} objects side by side in a {image_size}px image; "
            f"it must be < {math.ceil(image_size / max(max_objects - 1, 1))}."
        )


def _checked_size_fractions(size_fractions: dict[str, Sequence[float]] | None) -> dict[str, tuple[float, float]]:
    if size_fractions is None:
        return dict(SIZE_FRACTIONS)
    if set(size_fractions) != set(SIZES):
        raise ValueError(f"size_fractions must give a range for each of {SIZES}, got {sorted(size_fractions)}.")
    checked = {}
    for size, bounds in size_fractions.items():
        low, high = (float(v) for v in bounds)
        if not 0.0 < low <= high <= 0.9:
            raise ValueError(f"size_fractions[{size!r}] must be (min, max) with 0 < min <= max <= 0.9, got {bounds}.")
        checked[size] = (low, high)
    return checked


# Splits of at least this many images are drawn by worker processes (one per CPU, at most `_MAX_WORKERS`): drawing and
# PNG encoding take ~1 ms an image, so the demo's 12,500 images take half the time on 2 cores.
_PARALLEL_MIN_IMAGES = 2000
_MAX_WORKERS = 8


def _drawn_image(task: tuple[Any, ...]) -> tuple[bytes, bytes, dict[str, Any]]:
    """`_make_record(*task)` as (hash of the pixels, PNG bytes, record): what a worker sends back."""
    image, record = _make_record(*task)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    return hashlib.sha1(image.tobytes()).digest(), encoded.getvalue(), record


def _drawn_images(tasks: list[tuple[Any, ...]]) -> Iterator[tuple[bytes, bytes, dict[str, Any]]]:
    """`_drawn_image` of each task, in order; in worker processes when there are many (forked: nothing to import)."""
    workers = min(os.cpu_count() or 1, _MAX_WORKERS)
    if len(tasks) < _PARALLEL_MIN_IMAGES or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(_drawn_image, tasks)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_drawn_image, tasks, chunksize=64)


def _write_split(
    root: Path, split: str, count: int, seen_hashes: set[bytes], settings: dict[str, Any], bar: tqdm
) -> None:
    """Render and write one split's images and its .jsonl file under `root`."""
    singles = _split_plan(settings["seed"], split, count, settings["single_object_fraction"])
    heldout, seen_pairs = settings["heldout_pairs"], settings["seen_pairs"]
    pairs = (all_pairs(), heldout) if split == "test" and heldout else (seen_pairs, ())

    def task(index: int, attempt: int) -> tuple[Any, ...]:
        return (
            settings["seed"],
            split,
            index,
            attempt,
            bool(singles[index]),
            settings["image_size"],
            settings["max_objects"],
            pairs,
            settings["preamble_min_words"],
            settings["size_fractions"],
            settings["min_horizontal_gap"],
        )

    # Each image is a pure function of its task: first attempts are drawn ahead (in parallel), and a redraw is needed
    # only when an image repeats one drawn before, which is checked here in order.
    first_attempts = _drawn_images([task(index, 0) for index in range(count)])
    with open(root / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as handle:
        for index, drawn in enumerate(first_attempts):
            for attempt in range(1, _DUPLICATE_TRIES + 1):
                if drawn[0] not in seen_hashes:  # keeps the splits disjoint, pixel for pixel
                    break
                if attempt == _DUPLICATE_TRIES:
                    raise RuntimeError(
                        f"Could not draw a new image for {split} #{index}; the scene space is too small."
                    )
                drawn = _drawn_image(task(index, attempt))
            digest, png, record = drawn
            seen_hashes.add(digest)
            relative = f"images/{split}_{index:05d}.png"
            (root / relative).write_bytes(png)
            handle.write(json.dumps({"image": relative, **record}) + "\n")
            bar.update(1)


def _publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Move the finished staging folder to `output`, replacing an old one only when `overwrite` is set."""
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} exists and is not empty; pass overwrite=True to replace it.")
        # Move the old folder aside first, so that a failure leaves either the old or the new dataset in place.
        trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, trash / output.name)
        os.replace(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
        return
    if output.exists():
        output.rmdir()
    os.replace(staging, output)


def generate_dataset(
    output_dir: str | os.PathLike[str],
    num_train: int = 1000,
    num_val: int = 200,
    num_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    *,
    max_objects: int = 4,
    single_object_fraction: float = 0.3,
    num_heldout_pairs: int = 4,
    preamble_min_words: int = PREAMBLE_MIN_WORDS,
    size_fractions: dict[str, Sequence[float]] | None = None,
    min_horizontal_gap: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Generate the synthetic shapes dataset (see the module docstring for the layout and record format).

    The output is a pure function of the arguments (byte-identical files for the same ones). Writing is atomic:
    everything goes to a temporary folder next to `output_dir`, which is renamed into place at the end.

    Args:
        output_dir: folder to create; must not exist or be empty unless `overwrite` is set.
        num_train, num_val, num_test: number of images per split. Train and val never contain a held-out pair;
            every test image contains at least one. No image occurs twice across the splits.
        image_size: side of the square images in pixels (>= 32).
        seed: non-negative seed; it also chooses the held-out pairs.
        max_objects: objects per image are 1 (see `single_object_fraction`) or uniform in [2, max_objects].
        single_object_fraction: exact share of each split's images holding one object; those are the zero-shot
            classification examples (see :func:`zero_shot_examples`).
        num_heldout_pairs: number of (colour, shape) pairs kept out of train and val; 0 makes test like val.
        preamble_min_words: minimum length of the generic opening of long captions.
        size_fractions: per size name ("small", "large"), the (min, max) side of a shape's frame as a fraction of
            the image side; default `SIZE_FRACTIONS`.
        min_horizontal_gap: least horizontal distance in pixels between the box centres of two objects of an
            image, so that the left-to-right order of the caption can be seen; 0 allows any layout.
        overwrite: replace a non-empty `output_dir`.
        progress: show a tqdm progress bar.

    Returns:
        Paths: "root", "train", "val", "test" (the .jsonl files), "labels" (labels.json) and "images".
    """
    counts = {"train": num_train, "val": num_val, "test": num_test}
    _check_arguments(counts, image_size, seed, max_objects, single_object_fraction)
    _check_horizontal_gap(min_horizontal_gap, image_size, max_objects)
    size_fractions = _checked_size_fractions(size_fractions)
    output = Path(output_dir).resolve()
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not overwrite)):
        raise FileExistsError(f"{output} exists and is not an empty folder; pass overwrite=True to replace it.")
    heldout = choose_heldout_pairs(seed, num_heldout_pairs)
    settings = {
        "seed": seed,
        "image_size": image_size,
        "max_objects": max_objects,
        "single_object_fraction": single_object_fraction,
        "preamble_min_words": preamble_min_words,
        "heldout_pairs": heldout,
        "seen_pairs": [p for p in all_pairs() if p not in heldout],
        "size_fractions": size_fractions,
        "min_horizontal_gap": min_horizontal_gap,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        (staging / "images").mkdir()
        seen_hashes: set[bytes] = set()
        with tqdm(total=sum(counts.values()), desc="Generating shapes", unit="img", disable=not progress) as bar:
            for split, count in counts.items():
                _write_split(staging, split, count, seen_hashes, settings, bar)
        _write_labels(staging / "labels.json", heldout, counts, image_size, seed)
        _publish(staging, output, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dataset_paths(output)


def dataset_paths(root: Path) -> dict[str, Path]:
    """The paths of a generated dataset: "root", "train", "val", "test", "labels" and "images"."""
    splits = {split: root / f"{split}.jsonl" for split in SPLITS}
    return {"root": root, **splits, "labels": root / "labels.json", "images": root / "images"}


SETTINGS_STAMP = "generation_settings.json"
# Version of the record format, recorded in the stamp: a dataset written by an older generator is not reused.
RECORD_FORMAT = 2


def ensure_dataset(output_dir: str | os.PathLike[str], progress: bool = True, **settings: Any) -> dict[str, Path]:
    """The dataset `generate_dataset(output_dir, **settings)` writes, generated only when `output_dir` does not
    already hold one made with the same settings (recorded in `generation_settings.json` beside the splits).

    What the demo and the experiments use: a rerun with unchanged settings skips the generation, a changed setting
    replaces the folder. Returns the paths `generate_dataset` returns.
    """
    root = Path(output_dir).resolve()
    stamp = root / SETTINGS_STAMP
    recorded = json.dumps({**settings, "record_format": RECORD_FORMAT}, sort_keys=True)
    if stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == recorded:
        if progress:
            print(f"Reusing the dataset in {root}")
        return dataset_paths(root)
    paths = generate_dataset(root, overwrite=True, progress=progress, **settings)
    stamp.write_text(recorded + "\n", encoding="utf-8")
    return paths


def _write_labels(
    path: Path, heldout: Sequence[tuple[str, str]], counts: dict[str, int], image_size: int, seed: int
) -> None:
    labels = {
        "classes": [class_name(c, s) for c, s in all_pairs()],
        "heldout_pairs": [list(pair) for pair in heldout],
        "heldout_classes": [class_name(c, s) for c, s in heldout],
        "seen_classes": [class_name(c, s) for c, s in all_pairs() if (c, s) not in heldout],
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "image_size": image_size,
        "seed": seed,
        "counts": counts,
    }
    path.write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")


def load_labels(dataset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The labels.json of a generated dataset: "classes", "heldout_pairs", "heldout_classes", "seen_classes", ..."""
    return json.loads((Path(dataset_dir) / "labels.json").read_text(encoding="utf-8"))


def zero_shot_examples(records: Iterable[ImageRecord]) -> list[tuple[ImageRecord, str]]:
    """The records usable for zero-shot classification, with their label.

    Those are the records with exactly one object; the label is its class name ("colour shape"), one of
    labels.json's "classes". Records must come from :func:`mmgem.data.records.load_jsonl_records`, which keeps
    the "objects" field in `ImageRecord.metadata`.
    """
    examples = []
    for record in records:
        objects = record.metadata.get("objects") or []
        if len(objects) == 1:
            examples.append((record, class_name(objects[0]["colour"], objects[0]["shape"])))
    return examples


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("generate-data", "Generate the synthetic shapes image-caption dataset.")
    parser.add_argument("--output-dir", required=True, help="folder to create (must be absent or empty)")
    parser.add_argument("--num-train", type=int, default=1000, help="images in train.jsonl")
    parser.add_argument("--num-val", type=int, default=200, help="images in val.jsonl")
    parser.add_argument("--num-test", type=int, default=200, help="images in test.jsonl")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same dataset)")
    parser.add_argument("--max-objects", type=int, default=4, help="most shapes drawn in one image")
    parser.add_argument(
        "--single-object-fraction",
        type=float,
        default=0.3,
        help="share of images with exactly one shape (the zero-shot classification split)",
    )
    parser.add_argument(
        "--num-heldout-pairs",
        type=int,
        default=4,
        help="colour-shape pairs never seen together in train (compositional test)",
    )
    parser.add_argument(
        "--min-horizontal-gap",
        type=int,
        default=0,
        help="least horizontal distance in pixels between two objects' box centres (the caption lists them left "
        "to right)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `mmgem generate-data --output-dir DIR [--num-train N ...]`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with checking_user_input():  # generate_dataset checks every argument before it draws anything
        paths = generate_dataset(
            args.output_dir,
            args.num_train,
            args.num_val,
            args.num_test,
            args.image_size,
            args.seed,
            max_objects=args.max_objects,
            single_object_fraction=args.single_object_fraction,
            num_heldout_pairs=args.num_heldout_pairs,
            min_horizontal_gap=args.min_horizontal_gap,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    print(f"Wrote {paths['root']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
