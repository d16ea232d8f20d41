"""Property-based tests of the processor's and the model's public inputs (hypothesis, bounded to seconds): every
input gives either a ValueError / TypeError that names the argument, or the correct result, never a silently wrong
one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from tests.audit_inputs import expected_pixels  # noqa: E402  (the documented reading of an array image)

pytestmark = pytest.mark.fast

BOUNDED = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
NAMED_ERRORS = (ValueError, TypeError)


def assert_names(error: BaseException, argument: str) -> None:
    assert f"`{argument}" in str(error), f"the error does not name `{argument}`: {error}"


# ---------------------------------------------------------------------------------------------- images
DTYPES = [np.uint8, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64]
SHAPES = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 5)),
    st.tuples(st.integers(1, 5), st.integers(1, 12), st.integers(1, 12)),
)


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(SHAPES)
    if np.dtype(dtype).kind == "f":
        width = 16 if dtype == np.float16 else 32
        elements = st.one_of(st.floats(-2.0, 300.0, width=width), st.sampled_from([np.nan, np.inf, -np.inf]))
        # Mostly valid values, so that the correct-result branch is exercised too.
        if draw(st.booleans()):
            elements = st.floats(0.0, 1.0, width=width)
    elif dtype == np.uint8:
        elements = st.integers(0, 255)
    elif np.dtype(dtype).kind == "i":
        elements = st.integers(-300, 300) if draw(st.booleans()) else st.integers(0, 255)
    else:
        elements = None
    return draw(hnp.arrays(dtype, shape, elements=elements))


def valid_array(array: np.ndarray) -> bool:
    kind = array.dtype.kind
    if kind not in "uif":
        return False
    if kind == "f" and (not np.isfinite(array).all() or array.min() < 0 or array.max() > 1):
        return False
    if kind in "ui" and (array.min() < 0 or array.max() > 255):
        return False
    shape = array.shape
    if len(shape) == 3:
        channels_last = shape[-1] in (1, 3, 4)
        channels_first = shape[0] in (1, 3, 4)
        if not (channels_last or channels_first):
            return False
    return True


@BOUNDED
@given(array=arrays(), as_tensor=st.booleans())
def test_array_images_are_read_right_or_refused_by_name(tiny, array, as_tensor):
    _, processor = tiny
    image = torch.from_numpy(array) if as_tensor and array.dtype != np.uint16 else array
    try:
        pixel_values = processor(images=[image])["pixel_values"]
    except NAMED_ERRORS as error:
        assert_names(error, "images[0]")
        assert not valid_array(array) or min(array.shape[:2]) < 1 or _bad_ratio(array, as_tensor), error
        return
    assert valid_array(array), f"an invalid {array.dtype} array {array.shape} was accepted"
    torch.testing.assert_close(pixel_values, expected_pixels(processor, array, as_tensor))


def _bad_ratio(array: np.ndarray, channels_first: bool) -> bool:
    """Whether the image's size is refused by the aspect-ratio cap (32 by default)."""
    shape = array.shape
    if len(shape) == 3 and shape[0] in (1, 3, 4) and (channels_first or shape[-1] not in (1, 3, 4)):
        shape = shape[1:]
    height, width = shape[:2]
    return max(height, width) / min(height, width) > 32


@BOUNDED
@given(
    value=st.one_of(st.integers(), st.floats(), st.none(), st.binary(max_size=20), st.lists(st.integers(), max_size=3))
)
def test_non_images_are_refused_by_name(tiny, value):
    _, processor = tiny
    with pytest.raises(NAMED_ERRORS) as error:
        processor(images=[value])
    assert "images" in str(error.value)


# ---------------------------------------------------------------------------------------------- texts
CONTROL = ["<image>", "[EMB]", "[CAP]", "<s>", "</s>", "<pad>", "<unk>"]
TEXTS = st.one_of(
    st.text(max_size=30), st.lists(st.sampled_from(CONTROL + ["a", " red", "x"]), max_size=6).map("".join)
)


@BOUNDED
@given(texts=st.lists(TEXTS, min_size=0, max_size=4))
def test_texts_never_become_control_tokens(tiny, texts):
    _, processor = tiny
    try:
        batch = processor(text=texts)
    except NAMED_ERRORS as error:
        assert_names(error, "text")
        assert not texts or any(not t.strip() for t in texts), error
        return
    assert texts and all(t.strip() for t in texts)
    tokenizer = processor.tokenizer
    control = set(tokenizer.all_special_ids) | set(processor._special_ids().values())
    emb = processor._special_ids()["emb"]
    for row, mask, text in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), texts):
        tokens = [t for t, m in zip(row, mask) if m]
        assert tokens[0] == tokenizer.bos_token_id and tokens[-1] == emb
        body = tokens[1:-1]
        assert not control.intersection(body), f"{text!r} produced a control token"
        assert tokenizer.decode(body) == text  # read as plain text, losslessly


@BOUNDED
@given(value=st.one_of(st.integers(), st.none(), st.lists(st.one_of(st.integers(), st.none()), min_size=1, max_size=3)))
def test_non_texts_are_refused_by_name(tiny, value):
    _, processor = tiny
    with pytest.raises(NAMED_ERRORS) as error:
        processor(text=value)
    assert_names(error, "text")


@BOUNDED
@given(region_text=st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=2), st.none()))
def test_region_text_must_be_one_list_per_image(tiny, region_text):
    _, processor = tiny
    image = Image.new("RGB", (32, 32), "white")
    boxes = [[[0, 0, 8, 8], [4, 4, 20, 20]]]
    with pytest.raises(NAMED_ERRORS) as error:
        processor(images=[image], text=["a caption"], boxes=boxes, region_text=region_text)
    assert "region_text" in str(error.value)


# ---------------------------------------------------------------------------------------------- boxes
COORD = st.one_of(st.floats(-10, 50), st.sampled_from([float("nan"), float("inf")]), st.integers(-5, 40))


@BOUNDED
@given(boxes=st.lists(st.lists(COORD, min_size=3, max_size=5), min_size=1, max_size=3))
def test_pixel_boxes_map_inside_the_frame_or_are_refused_by_name(tiny, boxes):
    _, processor = tiny
    image = Image.new("RGB", (32, 24), "white")
    try:
        frame = processor(images=[image], boxes=[boxes])["boxes"][0]
    except NAMED_ERRORS as error:
        assert "boxes" in str(error)
        return
    array = np.asarray(boxes, dtype=np.float64)
    assert array.shape[1] == 4 and np.isfinite(array).all()
    assert ((array[:, 0] >= 0) & (array[:, 2] <= 32) & (array[:, 1] >= 0) & (array[:, 3] <= 24)).all()
    assert ((array[:, 2] > array[:, 0]) & (array[:, 3] > array[:, 1])).all()
    assert (
        ((frame >= 0) & (frame <= 1)).all() and (frame[:, 2] > frame[:, 0]).all() and (frame[:, 3] > frame[:, 1]).all()
    )


# ---------------------------------------------------------------------------------------------- model inputs
@BOUNDED
@given(ids=st.lists(st.lists(st.integers(-3, 400), min_size=1, max_size=6), min_size=1, max_size=3))
def test_model_token_ids_in_the_vocabulary_or_refused_by_name(tiny, ids):
    model, _ = tiny
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [row[-1]] * (width - len(row)) for row in ids])
    vocab = model.config.text_config.vocab_size
    with torch.no_grad():
        try:
            embeddings = model.get_text_features(input_ids=input_ids).pooler_output
        except NAMED_ERRORS as error:
            assert_names(error, "input_ids")
            assert (input_ids < 0).any() or (input_ids >= vocab).any(), error
            return
    assert ((input_ids >= 0) & (input_ids < vocab)).all()
    assert embeddings.shape == (len(ids), model.config.projection_dim) and torch.isfinite(embeddings).all()


@BOUNDED
@given(
    batch=st.integers(0, 2),
    fill=st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -float("inf")]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
)
def test_model_pixel_values_finite_or_refused_by_name(tiny, batch, fill, dtype):
    model, _ = tiny
    pixel_values = (
        torch.full((batch, 3, 32, 32), fill).to(dtype)
        if dtype.is_floating_point
        else torch.zeros(batch, 3, 32, 32, dtype=dtype)
    )
    with torch.no_grad():
        try:
            embeddings = model.get_image_features(pixel_values=pixel_values).pooler_output
        except NAMED_ERRORS as error:
            assert_names(error, "pixel_values")
            assert batch == 0 or not dtype.is_floating_point or not np.isfinite(fill), error
            return
    assert batch > 0 and dtype.is_floating_point and np.isfinite(fill)
    assert torch.isfinite(embeddings).all()
