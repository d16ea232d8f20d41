"""One way to turn texts, images and regions into MM-GEM vectors, and images into captions, in batches.

Every consumer in the library (evaluation, the standard benchmarks, search, MTEB, batch embedding) calls these
functions, as open_clip users call `encode_image(..., normalize=True)`::

    from mmgem.embedding import caption, encode_images, encode_regions, encode_texts

    text_vectors = encode_texts(model, processor, ["a red circle", "a blue square"])  # [2, D], unit length
    image_vectors = encode_images(model, processor, ["cat.jpg", pil_image])  # [2, D]
    region_vectors = encode_regions(model, processor, [pil_image], [[[0, 0, 32, 32], [8, 8, 60, 40]]])  # [2, D]
    captions = caption(model, processor, [pil_image], max_new_tokens=30, num_beams=3)  # ["a red circle"]

What they share:

- Inputs go to the model's device; the processor casts nothing, the model casts pixels to its tower's dtype.
- Vectors come back as float32 on the CPU, L2-normalised unless `normalize=False` (then they equal
  `get_*_features(...).pooler_output`).
- Images may be PIL images, paths or encoded bytes: each batch is loaded when it is reached (through the project's
  one image loader, with its URL, byte and pixel caps), so a long list of paths never sits decoded in memory.
- `pad_square=True` puts each image on a black square canvas (boxes shifted alike) before the processor sees it, so
  that a center crop cuts no region away; the standard region benchmarks use it.
- `progress=True` shows a tqdm bar per call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from modeling_mmgem.image_loading_mmgem import load_rgb_image

Boxes = Sequence[Sequence[float]]  # one image's pixel boxes, xyxy in the original image


def load_image(value: Any, index: int = 0) -> Image.Image:
    """An RGB image from a path, URL, encoded bytes, an array or a PIL image (the project's one image loader);
    `index` is its position in the caller's list, for error messages (`images[index]`)."""
    return load_rgb_image(value, index)


def pad_to_square(image: Image.Image, boxes: Boxes = ()) -> tuple[Image.Image, list[list[float]]]:
    """The image centered on a black square canvas and its pixel boxes shifted alike (nothing is cropped later)."""
    if image.width == image.height:
        return image, [list(b) for b in boxes]
    side = max(image.size)
    dx, dy = (side - image.width) // 2, (side - image.height) // 2
    canvas = Image.new("RGB", (side, side))
    canvas.paste(image, (dx, dy))
    return canvas, [[b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy] for b in boxes]


def batches(items: Sequence[Any], size: int, description: str, progress: bool) -> Iterator[tuple[int, Sequence[Any]]]:
    """`(start, items[start : start + size])` for consecutive slices of `items`, with a tqdm bar when `progress`."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"`batch_size` must be a positive integer; got {size!r}.")
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=description, disable=not progress, leave=False):
        yield start, items[start : start + size]


def _finish(vectors: torch.Tensor, normalize: bool) -> torch.Tensor:
    vectors = vectors.float()
    return (F.normalize(vectors, dim=-1) if normalize else vectors).cpu()


def _concat(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(rows) if rows else torch.zeros(0, 0)


def _image_inputs(
    model: Any, processor: Any, images: Sequence[Any], boxes: Sequence[Boxes] | None, pad_square: bool, start: int
) -> dict[str, Any]:
    """`pixel_values` (and `boxes`, normalised to the processed frame) of a batch, on the model's device; `start`:
    the position of the batch's first image in the caller's list (for error messages)."""
    loaded = [load_image(image, start + i) for i, image in enumerate(images)]
    if pad_square:
        padded = [pad_to_square(image, b if boxes is not None else ()) for image, b in zip(loaded, boxes or loaded)]
        loaded = [p[0] for p in padded]
        boxes = [p[1] for p in padded] if boxes is not None else None
    inputs = processor(images=loaded, boxes=[list(map(list, b)) for b in boxes] if boxes is not None else None)
    kwargs = {"pixel_values": inputs["pixel_values"].to(model.device)}
    if boxes is not None:
        kwargs["boxes"] = [b.to(model.device) for b in inputs["boxes"]]
    return kwargs


@torch.no_grad()
def encode_texts(
    model: Any,
    processor: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    normalize: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Text embeddings `[N, D]` (float32, CPU): h3 of the hidden state at `[EMB]`; texts longer than the
    tokenizer's limit are truncated."""
    if isinstance(texts, str):
        raise TypeError("`texts` must be a list of strings; got one string (wrap it in a list).")
    rows = []
    for _, chunk in batches(list(texts), batch_size, "Embedding texts", progress):
        inputs = processor(text=list(chunk), truncation=True).to(model.device)
        rows.append(_finish(model.get_text_features(**inputs).pooler_output, normalize))
    return _concat(rows)


@torch.no_grad()
def encode_images(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    *,
    batch_size: int = 64,
    normalize: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Image embeddings `[N, D]` (float32, CPU): h1 of the pooled feature map."""
    rows = []
    for start, chunk in batches(list(images), batch_size, "Embedding images", progress):
        inputs = _image_inputs(model, processor, chunk, None, False, start)
        rows.append(_finish(model.get_image_features(**inputs).pooler_output, normalize))
    return _concat(rows)


@torch.no_grad()
def encode_regions(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    boxes: Sequence[Boxes],
    *,
    batch_size: int = 64,
    normalize: bool = True,
    pad_square: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """Region embeddings `[sum R_i, D]` (float32, CPU): the regions of image 0 first, then image 1's, ...

    Args:
        boxes: per image, its regions' pixel boxes (xyxy in the original image); images without boxes are skipped.
        batch_size: images per forward (all boxes of an image go in the same forward).
    """
    if len(boxes) != len(images):
        raise ValueError(f"`boxes` needs one list of boxes per image: {len(images)} images, {len(boxes)} box lists.")
    pairs = [(image, b) for image, b in zip(images, boxes) if len(b)]
    rows = []
    for start, chunk in batches(pairs, batch_size, "Embedding regions", progress):
        inputs = _image_inputs(model, processor, [p[0] for p in chunk], [p[1] for p in chunk], pad_square, start)
        rows.append(_finish(model.get_image_features(**inputs).pooler_output, normalize))
    return _concat(rows)


@torch.no_grad()
def caption(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    *,
    boxes: Sequence[Boxes] | None = None,
    batch_size: int = 32,
    pad_square: bool = False,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Captions of the images, or with `boxes` of each region (regions of image 0 first; images without boxes
    skipped). `generate_kwargs` go to `model.generate` (e.g. `max_new_tokens`, `num_beams`); decoding is greedy
    unless they say otherwise."""
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"`boxes` needs one list of boxes per image: {len(images)} images, {len(boxes)} box lists.")
    if boxes is None:
        pairs = [(image, None) for image in images]
    else:
        pairs = [(image, b) for image, b in zip(images, boxes) if len(b)]
    generate_kwargs.setdefault("do_sample", False)
    captions: list[str] = []
    description = "Captioning regions" if boxes is not None else "Captioning images"
    for start, chunk in batches(pairs, batch_size, description, progress):
        chunk_boxes = [p[1] for p in chunk] if boxes is not None else None
        inputs = _image_inputs(model, processor, [p[0] for p in chunk], chunk_boxes, pad_square, start)
        captions += processor.decode_captions(model.generate(**inputs, **generate_kwargs))
    return captions
