"""The core install (`pip install mmgem`, no extras) loads and uses a model. A fresh interpreter sees the installed
packages minus the extras' (a folder of links to site-packages without them, `python -S`): the library still loads
a folder and embeds, and a feature that needs an extra names the `pip install "mmgem[...]"` that brings it."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
import textwrap

import pytest

from .outside import REPO_ROOT, saved_tiny_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Import and distribution names of the extras' packages (setup.py EXTRAS) and what they alone pull in.
EXTRA_PACKAGES = (
    "datasets",
    "matplotlib",
    "mpl_toolkits",
    "webdataset",
    "faiss",
    "faiss_cpu",
    "gradio",
    "gradio_client",
    "mteb",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "pycocoevalcap",
    "usearch",
    "nbmake",
    "playwright",
    "deepspeed",
    "ray",
    "lancedb",
)

SCRIPT = """
import importlib.util
for name in {refused!r}:
    assert importlib.util.find_spec(name) is None, name
from mmgem.embedding import encode_images, encode_texts
from mmgem.loading import load_model
from mmgem.evaluation.evaluate import evaluate_model
from mmgem.training.train import train
from mmgem.data.records import load_jsonl_records
from PIL import Image

model, processor = load_model({folder!r})
assert encode_texts(model, processor, ["a red circle"]).shape[0] == 1
assert encode_images(model, processor, [Image.new("RGB", (32, 32), "red")]).shape[0] == 1
try:
    from mmgem.data.records import load_imagefolder_records
    load_imagefolder_records({folder!r})
except ImportError as error:
    assert 'pip install "mmgem[data]"' in str(error), error
else:
    raise AssertionError("an imagefolder was read without the datasets package")
print("OK")
"""


def _without_extras(site_packages: str, folder) -> str:
    """A folder of links to every entry of `site_packages` but the extras' packages and their metadata."""
    folder.mkdir()
    for entry in os.scandir(site_packages):
        name = re.split(r"[-.]", entry.name.lower().replace("-", "_"), maxsplit=1)[0]
        if name not in EXTRA_PACKAGES and not entry.name.endswith(".pth"):
            os.symlink(entry.path, folder / entry.name)
    return str(folder)


def test_the_core_install_loads_embeds_and_names_missing_extras(tmp_path):
    folder = saved_tiny_folder(tmp_path / "model")
    script = textwrap.dedent(SCRIPT).format(refused=EXTRA_PACKAGES, folder=str(folder))
    packages = _without_extras(site.getsitepackages()[0], tmp_path / "site-packages")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), packages]),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
