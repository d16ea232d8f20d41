"""The data-pipeline benchmark runs end to end at tiny size and reports both sides for each model size."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_data_pipeline_benchmark_reports_pipeline_and_model_rates(tmp_path):
    from benchmarks.data_pipeline import main

    output = tmp_path / "out"
    argv = [
        "--sizes",
        "tiny",
        "--images",
        "16",
        "--batch-size",
        "2",
        "--batches",
        "2",
        "--steps",
        "1",
        "--workers",
        "2",
        "--output",
        str(output),
    ]
    assert main(argv) == 0
    (row,) = json.loads((output / "data_pipeline.json").read_text())["rows"]
    assert row["size"] == "tiny" and row["image_px"] == 32
    assert row["pipeline_images_per_s_per_worker"] > 0 and row["model_images_per_s"] > 0
    assert row["workers_needed"] == pytest.approx(row["model_images_per_s"] / row["pipeline_images_per_s_per_worker"])
    assert "| tiny | 32 |" in (output / "data_pipeline.md").read_text()
