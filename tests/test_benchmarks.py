"""The benchmark suite (`python -m benchmarks.run`) runs end to end on the tiny model and writes well-formed results.

No timing is asserted: numbers on a shared CI machine are noise. What must hold is the output contract: the
records' schema, `ratio == ours_s / baseline_s`, the curves and their PNGs, and clear errors for bad arguments.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.report import RECORD_KEYS, Record, target_met
from benchmarks.run import main, parse_args, run_suite

FAST_STEPS = (
    "image_embedding,text_embedding,caption_decode,caption_first_token,training_step,"
    "curve_visual_tokens,curve_text_length,curve_batch"
)
EXPECTED_FAST_RECORDS = {
    "image_embedding",
    "text_embedding",
    "caption_decode_per_token",
    "caption_first_token",
    "training_step",
}


def _check_records(records: list[dict], expected_names: set[str]) -> None:
    assert {r["name"] for r in records} == expected_names
    for r in records:
        assert set(RECORD_KEYS) <= set(r), r
        assert isinstance(r["name"], str) and isinstance(r["baseline"], str) and r["baseline"]
        assert r["size"] == "tiny" and r["device"] == "cpu" and r["dtype"] == "float32"
        assert isinstance(r["batch"], int) and r["batch"] >= 1
        assert math.isfinite(r["ours_s"]) and r["baseline_s"] > 0
        assert math.isclose(r["ratio"], r["ours_s"] / r["baseline_s"], rel_tol=1e-12)
        assert r["met"] == target_met(r["ratio"], r["target"])


def _run(tmp_path, only: str) -> tuple[list[dict], dict]:
    args = parse_args(
        ["--size", "tiny", "--quick", "--reps", "1", "--threads", "1", "--only", only, "--output", str(tmp_path)]
    )
    records, _ = run_suite(args)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == [r.to_dict() for r in records]
    curves_file = tmp_path / "curves.json"
    return on_disk, json.loads(curves_file.read_text()) if curves_file.exists() else {}


def test_quick_suite_writes_results_curves_and_table(tmp_path):
    torch.manual_seed(0)
    records, curves = _run(tmp_path, FAST_STEPS)
    _check_records(records, EXPECTED_FAST_RECORDS)
    assert set(curves) == {"visual_tokens", "text_length", "batch"}
    tokens = [p["visual_tokens"] for p in curves["visual_tokens"]["points"]]
    assert tokens[0] == 1 and tokens[-1] == 16  # pool grid 1x1 up to the full 4x4 patch grid of the tiny tower
    assert curves["visual_tokens"]["llava"]["visual_tokens"] == 16
    assert [p["tokens"] for p in curves["text_length"]["points"]][-1] == 256  # up to the tiny LM's context
    assert all(p["image_per_s"] > 0 for p in curves["batch"]["points"])
    for png in ("curve_visual_tokens.png", "curve_text_length.png", "curve_batch.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} |" in table for name in EXPECTED_FAST_RECORDS)
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["size"] == "tiny" and machine["torch_threads"] == 1


@pytest.mark.slow
def test_sentence_transformers_and_loading_comparisons(tmp_path):
    records, _ = _run(tmp_path, "st_encode,loading")
    _check_records(records, {"st_encode_text", "st_encode_image", "load_time", "load_peak_rss"})
    rss = next(r for r in records if r["name"] == "load_peak_rss")
    assert rss["unit"] == "GB" and rss["target"] == "<= 1.3"


def test_record_ratio_and_targets():
    record = Record("x", 2.0, "base", 4.0, "tiny", "cpu", "float32", 1, target="<= 1.05")
    assert record.ratio == 0.5 and record.met is True
    assert target_met(1.0, "< 1") is False and target_met(1.3, "<= 1.3") is True and target_met(0.5, "report") is None
    with pytest.raises(ValueError, match="baseline_s"):
        Record("x", 1.0, "base", 0.0, "tiny", "cpu", "float32", 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "image_embedding,nope"], "--only"),
        (["--threads", "0"], "--threads"),
        (["--reps", "0"], "--reps"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_arguments_are_rejected_before_any_work(argv, message, capsys):
    with pytest.raises(ValueError, match=message):
        parse_args(["--size", "tiny", *argv])
    assert main(["--size", "tiny", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no GPU"):
        parse_args(["--device", "cuda"])
