"""Shared fixtures: tiny random MM-GEM models and images, built in seconds and never downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmgem.build import tiny_mmgem


def random_images(count: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = ((40, 50), (32, 32), (64, 48))):
    """`count` random RGB PIL images of varied sizes (width, height)."""
    rng = np.random.RandomState(seed)
    return [
        Image.fromarray(rng.randint(0, 255, (sizes[i % len(sizes)][1], sizes[i % len(sizes)][0], 3), dtype=np.uint8))
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def tiny():
    """A tiny CLIP-vision + Llama MM-GEM in eval mode and its processor (module-scoped: do not modify it)."""
    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    return model.eval(), processor


@pytest.fixture()
def images():
    return random_images(4)


@pytest.fixture()
def fake_hub():
    """A running fake Hugging Face Hub on 127.0.0.1 (see tests/hub_server.py), stopped and wiped afterwards."""
    from tests.hub_server import FakeHub

    with FakeHub() as hub:
        yield hub


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and two threads on busy shared cores slow them down by orders of
    magnitude: run the in-process tests on one thread (subprocesses keep their own settings)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
