"""The demo pipeline end to end in its `--quick` form (tiny data and model, a few steps): every artefact appears.

The full demo (`make demo`, about ten minutes) is the one that reaches the targets; this test checks the wiring.
"""

from __future__ import annotations

import json

import pytest

from mmgem.cli import main as cli_main
from mmgem.demo import TARGETS


@pytest.mark.slow
def test_quick_demo_writes_metrics_plots_and_a_reloadable_hub_folder(tmp_path, capsys):
    output = tmp_path / "demo-output"
    assert cli_main(["demo", "--output-dir", str(output), "--quick", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Image -> text R@1" in printed and "Example captions" in printed and "Example region captions" in printed
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(TARGETS) <= set(metrics)
    summary = json.loads((output / "summary.json").read_text())
    assert set(summary["targets"]) == set(TARGETS)
    assert max(summary["reload_check"].values()) < 1e-4  # AutoModel and SentenceTransformer match the trained model
    for name in ("loss_curves.png", "retrieval_grid.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = output / "model"
    for name in ("config.json", "model.safetensors", "modeling_mmgem.py", "README.md", "modules.json"):
        assert (model / name).is_file(), name
    # A second run reuses the generated data.
    assert cli_main(["demo", "--output-dir", str(output), "--quick", "--no-progress"]) == 0
    assert "Reusing the dataset" in capsys.readouterr().out
