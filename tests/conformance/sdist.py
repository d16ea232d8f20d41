"""The test files of the installed transformers release, from its source distribution on the package registry.

The common test mixins (`ModelTesterMixin`, `ProcessorTesterMixin`) ship in transformers' sdist, not its wheel, and
are not copied into this repository: `transformers_tests()` downloads the sdist of the installed version with pip
(once; cached under `~/.cache/mmgem-conformance/`, or `$MMGEM_CONFORMANCE_CACHE`), extracts its `tests/` folder and
imports it as the package `transformers_sdist_tests`.

The sdist lacks three things those files import; each is stood in for here:
- `tests/generation/test_utils.py` (`GenerationTesterMixin`): an empty mixin class, so that `ModelTesterMixin`'s
  check "a model that can generate is tested with the generation mixin" holds; the generation checks themselves are
  ours (tests/conformance/test_generation_conformance.py).
- `tests/exporters/test_export.py` (`ExportTesterMixin`): an empty mixin (no export tests run from it).
- `utils/fetch_hub_objects_for_ci.py` (`url_to_local_path`): the fixture URLs the processor tests read map to local
  files made here (a PNG for images), so nothing is fetched from the Hub.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image

PACKAGE = "transformers_sdist_tests"


def cache_dir() -> Path:
    return Path(os.environ.get("MMGEM_CONFORMANCE_CACHE", Path.home() / ".cache" / "mmgem-conformance"))


def _extracted_tests(version: str) -> Path:
    """`tests/` of the transformers `version` sdist, downloaded and extracted once (atomically: concurrent runs
    and interrupted downloads never leave a half-extracted tree behind)."""
    root = cache_dir()
    target = root / f"transformers-{version}" / "tests"
    if (target / "test_modeling_common.py").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            f"transformers=={version}",
            "-d",
            scratch,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        archives = list(Path(scratch).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not archives:
            pytest.skip(
                f"the transformers {version} sdist (its common test suites) could not be fetched from the package "
                f"registry: {done.stderr.strip()[-300:]}",
                allow_module_level=True,
            )
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(f"transformers-{version}/tests/")]
            archive.extractall(scratch, members=members, filter="data")
        staged = Path(scratch) / f"transformers-{version}"
        try:
            staged.rename(root / f"transformers-{version}")
        except OSError:  # another run got there first
            pass
    return target


def _fixture_image() -> str:
    path = cache_dir() / "fixture_image.png"
    if not path.is_file():
        rng = np.random.RandomState(0)
        staged = path.with_suffix(".tmp.png")
        Image.fromarray(rng.randint(0, 255, (48, 64, 3), dtype=np.uint8)).save(staged)
        staged.replace(path)
    return str(path)


def _module(name: str, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


class GenerationTesterMixin:
    """Stands in for transformers' unpublished generation mixin (see the module docstring)."""


class ExportTesterMixin:
    """Stands in for transformers' unpublished export mixin (see the module docstring)."""


def url_to_local_path(url: str) -> str:
    """Local stand-in of a Hub fixture URL: a PNG made here for images; other media keep their URL (MM-GEM's
    processor takes no video or audio, so those tests do not read them)."""
    if url.endswith((".png", ".jpg", ".jpeg")):
        return _fixture_image()
    return url


def transformers_tests() -> types.ModuleType:
    """The `tests/` package of the installed transformers release (as `transformers_sdist_tests`)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    tests_dir = _extracted_tests(transformers.__version__)
    package = _module(PACKAGE, __path__=[str(tests_dir)])
    _module(f"{PACKAGE}.generation", __path__=[])
    _module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    _module(f"{PACKAGE}.exporters", __path__=[])
    _module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _module("fetch_hub_objects_for_ci", url_to_local_path=url_to_local_path)
    return package


def common(name: str) -> types.ModuleType:
    """One module of the sdist's tests, e.g. `common("test_modeling_common")`."""
    transformers_tests()
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    except ImportError as error:  # a release whose suite imports a file or package the stand-ins do not cover
        pytest.skip(
            f"transformers {transformers.__version__}'s {name}.py imports {error.name!r}, which its sdist and this "
            "environment do not provide",
            allow_module_level=True,
        )
