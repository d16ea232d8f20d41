"""Run a script where the project is NOT importable: a fresh interpreter, cwd in a temporary folder, PYTHONPATH
unset, the repository and the editable install's finder off `sys.path`. What a user without mmgem sees."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PRELUDE = f"""
import sys
sys.path = [p for p in sys.path if p not in ("", ".", {str(REPO_ROOT)!r})]
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
for name in ("modeling_mmgem", "mmgem"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"the project is importable ({{name}}): the test would prove nothing")
"""


def run_outside(script: str, cwd: Path, timeout: int = 600, extra_env: dict[str, str] | None = None) -> str:
    """Run `script` (dedented) after the prelude; assert it exits 0 and prints OK; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HOME": str(cwd / "hf_home"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra_env or {})
    code = PRELUDE + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-4000:] + result.stderr[-6000:]
    return result.stdout


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`mmgem ARGS...` as a user types it (this checkout's code), from `cwd`."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "mmgem.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def saved_tiny_folder(path: Path) -> Path:
    """A tiny random MM-GEM (seed 0) saved with its processor at `path`, as `save_pretrained` exports it."""
    import torch

    from mmgem.build import tiny_mmgem

    torch.manual_seed(0)
    model, processor = tiny_mmgem()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
