"""Images and boxes for MM-GEM: the one image loader (files, URLs, base64, bytes, arrays, PIL images, with byte,
pixel and time limits) and the mapping of pixel boxes into the frame of the processed image.

Part of the remote code: it travels to the Hub next to the weights with `processing_mmgem.py`, which imports it, and
imports only the standard library, numpy, PIL and torch (not transformers: the library's data readers use it
without loading any model machinery). The input limits are here too, each overridable by an environment variable.
"""

from __future__ import annotations

import base64
import io
import math
import os
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageCms

# ---------------------------------------------------------------------------------------------- input limits
# Caps on what one input may cost, each overridable with an environment variable (read at every call). A small
# file can decode to a huge image (a 300 KB PNG of 1 x 100,000 pixels resizes to 1.4 GB for a 224 px tower), and
# region pooling copies the feature map once per box.
INPUT_LIMITS = {
    "max_image_pixels": ("MMGEM_MAX_IMAGE_PIXELS", 64_000_000),  # width * height of one image (8000 x 8000)
    "max_aspect_ratio": ("MMGEM_MAX_ASPECT_RATIO", 32.0),  # long side / short side
    "max_boxes_per_image": ("MMGEM_MAX_BOXES_PER_IMAGE", 512),
    "image_url_timeout": ("MMGEM_IMAGE_URL_TIMEOUT", 10.0),  # seconds for a whole image download
    "max_image_bytes": ("MMGEM_MAX_IMAGE_BYTES", 64 * 2**20),  # an encoded image (file, URL, base64, bytes)
}


def input_limit(name: str) -> float:
    """The current value of the input limit `name` (see `INPUT_LIMITS`): its environment variable, else the
    default."""
    variable, default = INPUT_LIMITS[name]
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"The environment variable {variable} must be a positive number; got {value!r}.") from None
    if number <= 0:
        raise ValueError(f"The environment variable {variable} must be a positive number; got {value!r}.")
    return number


def image_size_problem(width: int, height: int) -> str | None:
    """Why a `width x height` image is refused (too many pixels, too elongated, empty), or None."""
    if width < 1 or height < 1:
        return f"is empty ({width}x{height} pixels)"
    max_pixels, max_ratio = input_limit("max_image_pixels"), input_limit("max_aspect_ratio")
    if width * height > max_pixels:
        return (
            f"has {width}x{height} = {width * height:,} pixels, more than the {int(max_pixels):,} allowed "
            "(MMGEM_MAX_IMAGE_PIXELS); resize it first"
        )
    if max(width, height) / min(width, height) > max_ratio:
        return (
            f"is {width}x{height} pixels, an aspect ratio above the {max_ratio:g} allowed (MMGEM_MAX_ASPECT_RATIO): "
            "the resize to the model's input would make it huge; crop it first"
        )
    return None


def too_many_boxes(count: int) -> str | None:
    """Why `count` boxes for one image are refused, or None."""
    limit = int(input_limit("max_boxes_per_image"))
    if count > limit:
        return f"has {count} boxes, more than the {limit} allowed per image (MMGEM_MAX_BOXES_PER_IMAGE)"
    return None


# ---------------------------------------------------------------------------------------------- boxes
def box_problem(
    boxes: Any,
    width: float | None = 1.0,
    height: float | None = 1.0,
    frame: str = "image",
    tolerance: float = 0.0,
) -> str | None:
    """Why `boxes` are not valid xyxy boxes of a `width x height` frame, or None when they are.

    The one box check of MM-GEM: the data records (pixel boxes of the original image), the processor (the same,
    before it maps them to the model's frame) and the model (boxes normalised to the `1 x 1` frame of
    `pixel_values`) all call it. A valid box has 4 finite numbers `x0, y0, x1, y1` with `0 <= x0 < x1 <= width` and
    `0 <= y0 < y1 <= height` (right and bottom edges exclusive, as `PIL.Image.getbbox`).

    Args:
        boxes: one box (4 numbers) or several (`[R, 4]`: nested lists, numpy array or tensor).
        width, height: size of the frame; None skips the bounds check (e.g. the image size is unknown).
        frame: how the problem names the frame (`"32x24 image"` gives "... is outside the 32x24 image").
        tolerance: how far a box may cross the frame's border (rounding of boxes that touch it).

    Returns:
        A phrase to follow the boxes' name in an error message (e.g. "has zero or negative area"), or None.
    """
    if isinstance(boxes, (list, tuple)) and any(_has_non_number(item) for item in boxes):
        return "is not 4 numbers"
    rows = _plain_rows(boxes)
    if rows is not None:  # Python numbers (data records, processor calls): checked without building a tensor
        return _rows_problem(rows, width, height, frame, tolerance)
    try:
        array = torch.as_tensor(boxes, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return "is not 4 numbers"
    if array.ndim == 1 and array.numel():
        array = array[None]
    if array.numel() == 0:
        return None  # no box: nothing to check
    if array.ndim != 2 or array.shape[-1] != 4:
        return f"is not 4 numbers per box (shape {tuple(array.shape)})"
    if not torch.isfinite(array).all():
        return "contains NaN or inf"
    x0, y0, x1, y1 = array.unbind(-1)
    if ((x1 <= x0) | (y1 <= y0)).any():
        return "has zero or negative area"
    if width is not None and height is not None:
        low, right, bottom = -tolerance, width + tolerance, height + tolerance
        if ((x0 < low) | (y0 < low) | (x1 > right) | (y1 > bottom)).any():
            return f"is outside the {frame}"
    return None


def _plain_rows(boxes: Any) -> list[Sequence[Any]] | None:
    """`boxes` as rows of 4 Python numbers (one box or a list of boxes), or None for any other form."""
    if not isinstance(boxes, (list, tuple)) or not boxes:
        return None
    rows = [boxes] if not isinstance(boxes[0], (list, tuple)) else boxes
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != 4 or not all(map(_is_plain_number, row)):
            return None
    return rows


def _is_plain_number(value: Any) -> bool:
    # A float, or an int a float holds exactly (larger ones, like NumPy scalars, take the tensor path).
    return type(value) is float or (type(value) is int and abs(value) <= 2**53)


def _rows_problem(
    rows: list[Sequence[Any]], width: float | None, height: float | None, frame: str, tolerance: float
) -> str | None:
    """`box_problem` for rows of 4 Python numbers: the same checks, in the same order, as on a tensor."""
    if not all(math.isfinite(v) for row in rows for v in row):
        return "contains NaN or inf"
    if any(x1 <= x0 or y1 <= y0 for x0, y0, x1, y1 in rows):
        return "has zero or negative area"
    if width is not None and height is not None:
        low, right, bottom = -tolerance, width + tolerance, height + tolerance
        if any(x0 < low or y0 < low or x1 > right or y1 > bottom for x0, y0, x1, y1 in rows):
            return f"is outside the {frame}"
    return None


def _has_non_number(value: Any) -> bool:
    """Whether (nested lists of) numbers hold something else: a string, a boolean, None or an empty list."""
    if isinstance(value, (list, tuple)):
        return len(value) == 0 or any(_has_non_number(item) for item in value)
    if isinstance(value, (bool, str, bytes)) or value is None:
        return True
    return False


# PIL modes that carry an alpha channel (premultiplied "La" / "RGBa" included); "P", "L" and "RGB" images may carry
# a transparent colour in `info["transparency"]` instead.
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
# Single-channel modes with more than 8 bits: PIL's own conversion to RGB clips them instead of rescaling.
_WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def load_rgb_image(
    image: Any, index: int = 0, allow_references: bool = True, url_timeout: float | None = None
) -> Image.Image:
    """The one image loader of MM-GEM: anything it accepts as an image -> an RGB PIL image.

    Accepted: a PIL image in any mode; a numpy array or torch tensor (HW, HWC or CHW with C in 1, 3, 4; uint8, or
    float in [0, 1]); an image file path, an http(s) URL, or a base64 / `data:image/...` string; encoded image bytes.
    Transparency is composited onto white (never left to turn black), 16-bit and float grey images are rescaled to 8
    bits, and the pixels are kept as stored (no EXIF rotation: region boxes are pixel coordinates of the stored image,
    as the data records read them). The processor, the sentence-transformers integration and the data records all
    load images here, so an image gives the same pixels, and the same embeddings, whichever way it comes in.

    Limits (see `INPUT_LIMITS` above, each overridable with an environment variable): an image may have at most
    `MMGEM_MAX_IMAGE_PIXELS` pixels and an aspect ratio of `MMGEM_MAX_ASPECT_RATIO` (checked from the file header,
    before decoding: no decompression bomb is decoded), an encoded image at most `MMGEM_MAX_IMAGE_BYTES`, and a URL
    download takes at most `MMGEM_IMAGE_URL_TIMEOUT` seconds in all.

    Arrays and tensors: uint8 (or another integer type with values in [0, 255]) or float in [0, 1]; other ranges,
    complex, boolean and object arrays are refused rather than guessed at. The layout of a 3-D input follows its
    library's convention where both readings are possible (e.g. 3 x H x 3): channels first for torch tensors (as
    `pixel_values` and torchvision), channels last for numpy arrays (as PIL and matplotlib).

    Args:
        image: the image.
        index: its position in the caller's list, for error messages (`images[index]`).
        allow_references: whether strings and paths may be opened (files, URLs, base64). sentence-transformers
            turns any text that ends in `.png` or starts with `http` into an image reference; its MM-GEM module
            config sets this to False so that a text is never read as a file or fetched.
        url_timeout: seconds a URL download may take in all; default `MMGEM_IMAGE_URL_TIMEOUT`.
    """
    if isinstance(image, (str, os.PathLike)):
        if not allow_references:
            raise ValueError(
                f"`images[{index}]` is a string ({os.fspath(image)[:100]!r}) and this call does not open files or "
                "URLs: give the image as a PIL image or array. (sentence-transformers reads texts that end in an "
                'image extension or start with http as images; to embed such a text, pass it as {"text": ...}.)'
            )
        image = _open_image_reference(os.fspath(image), index, url_timeout)
    elif isinstance(image, (bytes, bytearray)):
        image = _open_image_bytes(bytes(image), index, "the given bytes")
    if isinstance(image, Image.Image):
        _check_image_size(image.width, image.height, index)
        return _without_orientation(_pil_to_rgb(image))
    channels_first = isinstance(image, torch.Tensor)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point() and image.dtype not in (torch.float32, torch.float64):
            image = image.float()  # bf16 / fp16: numpy has no bf16
        if image.is_complex():
            raise TypeError(f"`images[{index}]` is a complex tensor; expected uint8 or float pixel values.")
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"`images[{index}]` must be a PIL image, a numpy array, a torch tensor or an image path / URL; "
            f"got {type(image).__name__}."
        )
    return _pil_to_rgb(Image.fromarray(_array_to_uint8(image, index, channels_first)))


def _without_orientation(image: Image.Image) -> Image.Image:
    """`image` (a new RGB image, not the caller's) without its EXIF / XMP metadata: the pixels are the stored ones,
    and a later EXIF-honouring step (transformers' `load_image`, `ImageOps.exif_transpose`) must not rotate them
    after all, or the same file would give other pixels (and boxes other regions) on another path."""
    for key in ("exif", "xmp", "XML:com.adobe.xmp"):
        image.info.pop(key, None)
    if getattr(image, "_exif", None) is not None:
        image._exif = None  # Pillow caches the parsed EXIF on the image
    return image


def _check_image_size(width: int, height: int, index: int) -> None:
    problem = image_size_problem(width, height)
    if problem:
        raise ValueError(f"`images[{index}]` {problem}.")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited onto white, wide grey modes rescaled to 8 bits."""
    if image.mode in _WIDE_GREY_MODES:
        grey = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            grey = grey * 255.0 if grey.max(initial=0.0) <= 1.0 else grey  # float images are taken to be in [0, 1]
        elif grey.max(initial=0.0) > 255:
            grey = grey / 257.0  # 16-bit range (65535 -> 255)
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")  # PIL: no La -> RGBA
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "LAB":  # PIL's plain conversion copies the channels; a colour transform is needed
        return ImageCms.applyTransform(image, _lab_to_srgb())
    return image.convert("RGB")


def _lab_to_srgb() -> Any:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


def _array_to_uint8(image: np.ndarray, index: int, channels_first: bool = False) -> np.ndarray:
    """An HW / HWC / CHW array (uint8, or float in [0, 1]) -> an HW or HWC uint8 array for `Image.fromarray`.

    `channels_first` decides a 3-D shape that reads both ways (first and last axes both 1, 3 or 4)."""
    array = image
    if array.dtype.kind not in "uif":
        raise TypeError(
            f"`images[{index}]` has dtype {array.dtype}; expected uint8 (0-255) or float (0-1) pixel values."
        )
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and (channels_first or array.shape[-1] not in (1, 3, 4)):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or min(array.shape[:2]) < 1:
        raise ValueError(
            f"`images[{index}]` must have shape [H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4); "
            f"got {tuple(image.shape)}."
        )
    _check_image_size(array.shape[1], array.shape[0], index)
    if array.dtype.kind in "ui" and array.dtype != np.uint8:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"`images[{index}]` is an integer array with values in [{low}, {high}]; expected 0-255 (uint8)."
            )
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f":
        array = np.asarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"`images[{index}]` contains NaN or inf.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            # One bright pixel must not switch the whole image to another scale: refuse instead of guessing.
            raise ValueError(
                f"`images[{index}]` is a float array with values in [{low:g}, {high:g}]; float images must be in "
                "[0, 1] (give uint8 for 0-255 values)."
            )
        array = np.rint(array * 255.0).astype(np.uint8)
    return np.ascontiguousarray(array)


def _open_image_reference(reference: str, index: int, url_timeout: float | None = None) -> Image.Image:
    """A local image file, an http(s) URL or a base64 / `data:image/...` string, opened and read with PIL."""
    is_url = reference.startswith(("http://", "https://"))
    max_bytes = int(input_limit("max_image_bytes"))
    try:
        if is_url:
            timeout = input_limit("image_url_timeout") if url_timeout is None else url_timeout
            data = _download(reference, max_bytes, timeout, index)
        elif os.path.isfile(reference):
            if os.path.getsize(reference) > max_bytes:
                raise ValueError(
                    f"`images[{index}]`: {reference[:200]!r} has more than {max_bytes:,} bytes (MMGEM_MAX_IMAGE_BYTES)."
                )
            with open(reference, "rb") as file:
                data = file.read()
        elif reference.startswith("data:image/") or _looks_like_base64(reference):
            if len(reference) * 3 // 4 > max_bytes:
                raise ValueError(f"`images[{index}]`: the base64 image has more than {max_bytes:,} bytes.")
            data = base64.b64decode(reference.split(",", 1)[1] if reference.startswith("data:") else reference)
        else:
            raise ValueError(
                f"`images[{index}]` must be a PIL image, a numpy array, a torch tensor or an image path / URL; "
                f"{reference[:200]!r} is not an existing file, an http(s) URL or base64 image data."
            )
    except ValueError:
        raise
    except Exception as error:  # urllib, base64 and the file system raise many types; name the argument instead
        raise ValueError(
            f"`images[{index}]` must be a PIL image, a numpy array, a torch tensor or an image path / URL; "
            f"{reference[:200]!r} could not be loaded: {error}"
        ) from error
    return _open_image_bytes(data, index, repr(reference[:200]))


def _download(url: str, max_bytes: int, timeout: float, index: int) -> bytes:
    """The body of `url`, read in chunks within `timeout` seconds in all (a server that never answers, or drips
    bytes, cannot hold the caller) and at most `max_bytes` long."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    with urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(65536):
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"`images[{index}]`: {url[:200]!r} sends more than {max_bytes:,} bytes.")
            if time.monotonic() > deadline:
                raise ValueError(f"`images[{index}]`: {url[:200]!r} took more than {timeout:g} s to download.")
            chunks.append(chunk)
    return b"".join(chunks)


def _open_image_bytes(data: bytes, index: int, source: str) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ...), decoded now: the result does not depend on a file staying open.

    The size limits are checked on the header, before any pixel is decoded."""
    max_bytes = int(input_limit("max_image_bytes"))
    if len(data) > max_bytes:
        raise ValueError(f"`images[{index}]`: {source} has more than {max_bytes:,} bytes (MMGEM_MAX_IMAGE_BYTES).")
    try:
        opened = Image.open(io.BytesIO(data))  # the header only
    except Image.DecompressionBombError:  # PIL refuses headers of over twice its own limit in `open` itself
        opened = None
    except Exception as error:  # PIL raises many types for broken files; name the argument instead
        raise ValueError(f"`images[{index}]`: {source} is not a readable image: {error}") from error
    size = _header_size(data) if opened is None else opened.size
    size_problem = image_size_problem(*size) if size is not None else "claims more pixels than PIL decodes"
    if size_problem is not None:
        raise ValueError(f"`images[{index}]`: {source} {size_problem}.")
    try:
        with opened:
            opened.load()
            return opened.copy()
    except Exception as error:  # PIL raises many types for broken files (truncated ones...); name the argument
        raise ValueError(f"`images[{index}]`: {source} is not a readable image: {error}") from error


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, for images PIL refuses to open at all (over twice its limit)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _looks_like_base64(reference: str) -> bool:
    """A long string of base64 characters only (a path of that shape would have to exist to be read as one)."""
    return len(reference) > 64 and all(c.isalnum() or c in "+/=\n" for c in reference)


def _size_dict(value: Any) -> dict[str, int]:
    if isinstance(value, dict):
        return dict(value)
    if hasattr(value, "items"):
        return {k: v for k, v in value.items() if v is not None}
    if isinstance(value, int):
        return {"height": value, "width": value}
    return {
        k: getattr(value, k) for k in ("height", "width", "shortest_edge", "longest_edge") if getattr(value, k, None)
    }


def image_frame_transform(image_processor: Any, width: int, height: int) -> tuple[float, float, float, float, int, int]:
    """How the image processor maps an original `width x height` image to the model's frame.

    Returns:
        (scale_x, scale_y, offset_x, offset_y, frame_width, frame_height): a pixel x in the original image lands at
        `x * scale_x - offset_x` in the model frame of size `frame_width x frame_height` (resize, then crop).
    """
    new_w, new_h = width, height
    if getattr(image_processor, "do_resize", False):
        size = _size_dict(image_processor.size)
        if "shortest_edge" in size:
            short, long = (width, height) if width <= height else (height, width)
            new_short = size["shortest_edge"]
            new_long = int(new_short * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            new_w, new_h = size["width"], size["height"]
    offset_x = offset_y = 0.0
    frame_w, frame_h = new_w, new_h
    if getattr(image_processor, "do_center_crop", False):
        crop = _size_dict(image_processor.crop_size)
        frame_w, frame_h = crop["width"], crop["height"]
        offset_x, offset_y = (new_w - frame_w) // 2, (new_h - frame_h) // 2
    return new_w / width, new_h / height, float(offset_x), float(offset_y), frame_w, frame_h


class FrameSettings:
    """The resize / crop settings of an image processor with per-call overrides (`images_kwargs`), for
    `image_frame_transform`: boxes map through the transform the pixels actually went through."""

    def __init__(self, image_processor: Any, overrides: dict[str, Any]) -> None:
        for name in ("do_resize", "size", "do_center_crop", "crop_size"):
            value = overrides.get(name)
            setattr(self, name, value if value is not None else getattr(image_processor, name, None))


def boxes_to_model_frame(image_processor: Any, boxes: Any, width: int, height: int, index: int) -> torch.Tensor:
    """Pixel xyxy boxes of an original `width x height` image -> normalised xyxy in the model's frame [R, 4].

    Boxes must lie inside the original image and have positive area; a box the center crop removes entirely is
    refused, one it cuts is clipped to the visible part.
    """
    expected = (
        f"`boxes[{index}]` must be a list of [x0, y0, x1, y1] in pixels of the original image "
        f"({width}x{height}) with 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height"
    )
    problem = box_problem(boxes.tolist() if isinstance(boxes, torch.Tensor) else boxes, width, height, "image")
    if problem is None and hasattr(boxes, "__len__"):
        problem = too_many_boxes(len(boxes))
    if problem:
        raise ValueError(f"{expected}; a box {problem}: {boxes!r}.")
    array = np.asarray(boxes.tolist() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if array.size == 0:
        return torch.zeros(0, 4)
    array = array.reshape(-1, 4)
    x0, y0, x1, y1 = array.T
    sx, sy, ox, oy, fw, fh = image_frame_transform(image_processor, width, height)
    frame = np.stack([(x0 * sx - ox) / fw, (y0 * sy - oy) / fh, (x1 * sx - ox) / fw, (y1 * sy - oy) / fh], axis=1)
    frame = np.clip(frame, 0.0, 1.0)
    if ((frame[:, 2] <= frame[:, 0]) | (frame[:, 3] <= frame[:, 1])).any():
        raise ValueError(f"{expected}; a box lies entirely in the part the center crop removes: {array.tolist()}.")
    return torch.tensor(frame, dtype=torch.float32)
