"""PEFT's own common adapter tests, from the published source distribution of the INSTALLED peft release.

`pip download --no-deps --no-binary :all: peft==<installed>` fetches the sdist from the package registry once; it is
unpacked under `~/.cache/mmgem-peft-tests/` (or `$MMGEM_PEFT_TESTS_CACHE`) and its `tests/` folder is imported as the
package `peft_upstream_tests` (never copied into this repository).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import types
from importlib.metadata import version
from pathlib import Path

PACKAGE = "peft_upstream_tests"


def cache_root() -> Path:
    return Path(os.environ.get("MMGEM_PEFT_TESTS_CACHE", Path.home() / ".cache" / "mmgem-peft-tests"))


def upstream_tests_folder() -> Path:
    """`tests/` of the installed peft's sdist, downloaded and unpacked once."""
    release = version("peft")
    root = cache_root()
    folder = root / f"peft-{release}" / "tests"
    if (folder / "testing_common.py").is_file():
        return folder
    sdists = root / "sdist"
    archive = sdists / f"peft-{release}.tar.gz"
    if not archive.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"peft=={release}",
                "-d",
                str(sdists),
            ],
            check=True,
        )
    staging = root / f".peft-{release}.partial"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"peft-{release}/tests/") and m.isfile()]
        tar.extractall(staging, members=members, filter="data")
    (staging / f"peft-{release}").rename(root / f"peft-{release}")
    staging.rmdir()
    return folder


def import_upstream(module: str) -> types.ModuleType:
    """Import `module` (e.g. "testing_common") from peft's sdist tests as `peft_upstream_tests.<module>`.

    `testing_common` imports `diffusers` at the top for its Stable Diffusion tests only; where diffusers is not
    installed (it is no dependency of ours), an empty stand-in module is registered so the decoder tests import.
    """
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(upstream_tests_folder())]
        sys.modules[PACKAGE] = package
    stand_in = None
    try:
        importlib.import_module("diffusers")
    except ImportError:
        stand_in = types.ModuleType("diffusers")
        # Used only by the Stable Diffusion tests (not run here) and in `isinstance` checks: a class nothing is.
        stand_in.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stand_in
    try:
        return importlib.import_module(f"{PACKAGE}.{module}")
    finally:
        if stand_in is not None:  # nothing else may mistake it for the real package
            del sys.modules["diffusers"]
