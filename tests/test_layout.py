"""The project's layout: weight names that saved checkpoints depend on."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmgem.build import tiny_mmgem

pytestmark = pytest.mark.fast

DATA = Path(__file__).parent / "data"


def test_weight_names_are_unchanged():
    """Every published checkpoint loads by these names: renaming a module breaks them all silently (random init)."""
    model, _ = tiny_mmgem()
    names = [f"{name} {tuple(tensor.shape)}" for name, tensor in model.state_dict().items()]
    committed = (DATA / "tiny_mmgem_state_dict_keys.txt").read_text(encoding="utf-8").splitlines()
    assert names == committed
