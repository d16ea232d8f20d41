"""The pipelines as the README shows them: images as paths or URLs, opened by MM-GEM's own loader (the same pixels
and limits as the processor), and `generate` options such as `num_beams` given directly to the caption pipeline."""

from __future__ import annotations

import http.server
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import pipeline

from modeling_mmgem.image_loading_mmgem import load_rgb_image

from .outside import saved_tiny_folder

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_tiny_folder(tmp_path_factory.mktemp("caption") / "tiny-mmgem")


@pytest.fixture(scope="module")
def caption(folder):
    return pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def rotated_jpeg(tmp_path_factory):
    """A JPEG whose EXIF says "rotate 90°": its stored pixels differ from the rotated view."""
    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 255, (24, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path_factory.mktemp("exif") / "cat.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def _expected_caption(pipe, image, **generate_options) -> str:
    model, processor = pipe.model, pipe.processor
    with torch.no_grad():
        ids = model.generate(**processor(images=image), **generate_options)
    return processor.decode_captions(ids)[0]


def test_a_path_is_an_image_opened_as_the_processor_opens_it(caption, rotated_jpeg, monkeypatch):
    stored = load_rgb_image(str(rotated_jpeg))
    assert stored.size == (48, 24)  # the stored pixels, not the EXIF-rotated view
    assert ImageOps.exif_transpose(Image.open(rotated_jpeg)).size == (24, 48)
    got = caption(images=str(rotated_jpeg), max_new_tokens=6)
    assert got[0]["generated_text"] == _expected_caption(caption, stored, max_new_tokens=6)
    assert "cat.jpg" not in got[0]["generated_text"]
    both = caption(images=[str(rotated_jpeg), stored], max_new_tokens=6)
    assert [r[0]["generated_text"] for r in both] == [got[0]["generated_text"]] * 2
    # The chat form opens the same file the same way (transformers' own loader would rotate it): the model is
    # given the very pixels of the stored image.
    seen = []
    generate = caption.model.generate
    monkeypatch.setattr(caption.model, "generate", lambda *a, **k: seen.append(k["pixel_values"]) or generate(*a, **k))
    expected_pixels = caption.processor(images=stored)["pixel_values"]
    for part in ({"type": "image", "image": str(rotated_jpeg)}, {"type": "image", "url": str(rotated_jpeg)}):
        chat = caption(text=[{"role": "user", "content": [part]}], max_new_tokens=6, return_full_text=False)
        assert chat[0]["generated_text"] == got[0]["generated_text"]
    caption(images=str(rotated_jpeg), max_new_tokens=2)
    assert len(seen) == 3
    for pixels in seen:
        torch.testing.assert_close(pixels, expected_pixels)
    # The loaded image carries no orientation left for a later EXIF-honouring step to apply.
    assert ImageOps.exif_transpose(stored).size == stored.size


def test_generate_options_given_directly_reach_generate(caption, rotated_jpeg, monkeypatch):
    calls = []
    generate = caption.model.generate

    def recording_generate(*args, **kwargs):
        calls.append(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(caption.model, "generate", recording_generate)
    got = caption(images=str(rotated_jpeg), max_new_tokens=8, num_beams=3, length_penalty=0.5)
    assert calls[-1]["num_beams"] == 3 and calls[-1]["length_penalty"] == 0.5 and calls[-1]["max_new_tokens"] == 8
    monkeypatch.setattr(caption.model, "generate", generate)
    expected = _expected_caption(caption, str(rotated_jpeg), max_new_tokens=8, num_beams=3, length_penalty=0.5)
    assert got[0]["generated_text"] == expected
    with pytest.raises(ValueError, match="num_beams"):
        caption(images=str(rotated_jpeg), num_beams=3, generate_kwargs={"num_beams": 2})


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    delay = 0.0

    def do_GET(self):  # noqa: N802 (http.server's name)
        time.sleep(self.delay)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            self.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture()
def image_server(rotated_jpeg):
    _Handler.body = rotated_jpeg.read_bytes()
    _Handler.delay = 0.0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cat.jpg"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.timeout(120)
def test_urls_use_the_loaders_limits_and_timeout(caption, folder, image_server, rotated_jpeg, monkeypatch):
    stored = load_rgb_image(str(rotated_jpeg))
    assert caption(images=image_server, max_new_tokens=5)[0]["generated_text"] == _expected_caption(
        caption, stored, max_new_tokens=5
    )
    classify = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    labels = ["red circle", "blue square", "green star"]
    assert classify(image_server, candidate_labels=labels) == classify(stored, candidate_labels=labels)
    monkeypatch.setenv("MMGEM_MAX_IMAGE_BYTES", "100")
    with pytest.raises(ValueError, match="100 bytes"):
        caption(images=image_server, max_new_tokens=5)
    monkeypatch.delenv("MMGEM_MAX_IMAGE_BYTES")
    monkeypatch.setenv("MMGEM_MAX_IMAGE_PIXELS", "100")  # checked on the header, before decoding
    with pytest.raises(ValueError, match="MMGEM_MAX_IMAGE_PIXELS"):
        caption(images=image_server, max_new_tokens=5)
    monkeypatch.delenv("MMGEM_MAX_IMAGE_PIXELS")
    _Handler.delay = 3.0
    start = time.monotonic()
    with pytest.raises(ValueError, match="could not be loaded|took more than"):
        caption(images=image_server, max_new_tokens=5, timeout=0.5)
    assert time.monotonic() - start < 2.5
