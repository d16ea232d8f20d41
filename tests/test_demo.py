"""The demo pipeline end to end in its `--quick` form (tiny data and model, a few steps): every artefact appears.

The full demo (`make demo`) is measured by `python -m experiments.demo_seeds` (docs/results.md); this checks the wiring.
"""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.slow
def test_curve_and_hard_negatives_in_the_quick_demo(tmp_path):
    from mmgem.demo import QUICK, DemoConfig, run_demo

    config = DemoConfig(**{**QUICK, "stage1_steps": 2, "stage2_steps": 3}, curve_every=2, hard_negative_group_size=2)
    summary = run_demo(tmp_path / "out", config, progress=False)
    points = json.loads((tmp_path / "out" / "curve.json").read_text())
    # Every 2 steps and at each stage's end, on one step axis across the stages.
    assert [(p["stage"], p["step"]) for p in points] == [("stage 1", 2), ("stage 2", 4), ("stage 2", 5)]
    # The last point is the final model, evaluated as the demo's own result is.
    assert {key: points[-1][key] for key in TARGETS} == {key: summary["metrics"][key] for key in TARGETS}
    assert (tmp_path / "out" / "target_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["timings"]["curve_evaluation_cpu_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_training_processes_train_one_model_and_the_curve_comes_back(tmp_path):
    """With `processes=2` the stages train one DDP model in two processes (the data split between them, saved once),
    rank 0 evaluates the curve, and this process evaluates and exports the result as with one process."""
    from mmgem.demo import QUICK, DemoConfig, run_demo

    config = DemoConfig(**{**QUICK, "threads": 2, "stage1_steps": 2, "stage2_steps": 3}, processes=2, curve_every=2)
    output = tmp_path / "out"
    summary = run_demo(output, config, progress=False)
    points = json.loads((output / "curve.json").read_text())
    assert [(p["stage"], p["step"]) for p in points] == [("stage 1", 2), ("stage 2", 4), ("stage 2", 5)]
    assert {key: points[-1][key] for key in TARGETS} == {key: summary["metrics"][key] for key in TARGETS}
    # 24 training records, 2 processes x 4 per step: 3 steps are one epoch (two replicas on all the data: half).
    log = json.loads((output / "stage2" / "training_log.json").read_text())
    assert log[-1]["step"] == 3 and log[-1]["epoch"] == pytest.approx(1.0)
    assert max(summary["reload_check"].values()) < 1e-4
    assert summary["timings"]["training_cpu_s"] > summary["timings"]["curve_evaluation_cpu_s"] > 0
    assert not (output / "curve-points.json").exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"processes": 0}, "`processes` must be a positive int"),
        ({"processes": 2, "threads": 1}, r"`threads` \(1\) must be at least `processes` \(2\)"),
        ({"processes": 2, "threads": 2, "batch_size": 63}, r"`batch_size` \(63\) must be a multiple of `processes`"),
        ({"processes": 2, "threads": 2, "stage2_batch_size": 5}, r"`stage2_batch_size` \(5\) must be a multiple"),
        ({"tower_autocast_dtype": "bf16"}, "`tower_autocast_dtype` must be one of"),
        ({"attn_implementation": "flash"}, "`attn_implementation` must be one of"),
        ({"num_beams": 0}, "`num_beams` must be a positive int"),
    ],
)
def test_a_bad_process_count_or_precision_setting_fails_before_work(tmp_path, fields, message):
    from mmgem.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match=message):
        run_demo(tmp_path / "out", DemoConfig(**fields))
    assert not (tmp_path / "out").exists()


def test_bad_curve_setting_fails_before_work(tmp_path):
    from mmgem.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match="`curve_every` must be None or a positive int"):
        run_demo(tmp_path / "out", DemoConfig(curve_every=0))
    assert not (tmp_path / "out").exists()


def test_bad_seed_is_refused_by_its_flag(tmp_path, capsys):
    assert cli_main(["demo", "--output-dir", str(tmp_path / "out"), "--seed", "-1"]) == 2
    assert "`--seed` must be a non-negative int" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_targets_table_shows_the_wall_time_against_its_target():
    from mmgem.demo import WALL_TIME_TARGET_S, target_report

    metrics = {key: minimum for key, minimum in TARGETS.items()}  # exactly the minimum meets a target
    table, targets = target_report(metrics, WALL_TIME_TARGET_S + 1)
    assert all(target["met"] for target in targets.values())
    assert table.splitlines()[-1].split("|")[2:5] == [f" <= {WALL_TIME_TARGET_S:.0f} s ", " 601 s    ", " NO  "]


@pytest.mark.slow
def test_demo_seeds_and_the_ablation_diagnosis_on_the_quick_demo(tmp_path):
    from experiments import demo_ablation, demo_seeds

    results = tmp_path / "seeds.json"
    assert demo_seeds.main(["--output-dir", str(tmp_path), "--seeds", "3", "--quick", "--results", str(results)]) == 0
    record = json.loads(results.read_text())
    (run,) = record["runs"]
    assert run["seed"] == 3 and run["targets_met"] is False and run["process_wall_s"] > run["timings"]["total_s"]
    assert json.loads((tmp_path / "seed3" / "summary.json").read_text())["config"]["seed"] == 3

    diagnosis = demo_ablation.diagnose(tmp_path / "seed3" / "stage2", tmp_path / "seed3" / "data", max_new_tokens=6)
    data = tmp_path / "seed3" / "data"
    singles = sum(" and " not in json.loads(line)["caption"] for line in (data / "val.jsonl").read_text().splitlines())
    assert diagnosis["zero_shot"]["images"] == singles
    assert diagnosis["zero_shot"]["colour wrong"] + diagnosis["zero_shot"]["shape wrong"] <= 2 * singles
    multi = diagnosis["multi_object_captions"]
    assert set(multi) == {"colour_order_right", "shape_right", "size_right", "shapes_right_as_a_set"}
    first = diagnosis["first_object_right_by_leftmost_size"]
    sizes = [json.loads(line)["objects"][0]["size"] for line in (data / "val.jsonl").read_text().splitlines()]
    several = [json.loads(line)["caption"].count(" a ") > 0 for line in (data / "val.jsonl").read_text().splitlines()]
    assert set(first) == {size for size, many in zip(sizes, several) if many}
    assert all(0 <= value <= 1 for value in first.values())
    assert 0 <= diagnosis["large_object_first_when_leftmost_small"] <= 1
    binding = diagnosis["binding"]
    if binding["objects"]:  # tiny data: an object counts only when its colour is one token of the tiny tokenizer
        assert 0 <= binding["attention_on_object"] + binding["attention_on_other_object"] <= 1 + 1e-6
        assert 0 <= binding["shape_right_given_previous_words"] <= 1


def test_caption_phrases_split_on_commas_and_and():
    from experiments.demo_ablation import _phrases

    assert _phrases("a small red circle, a large blue star and a small green cross") == [
        "a small red circle",
        "a large blue star",
        "a small green cross",
    ]


def test_objects_sharing_a_colour_are_matched_by_their_rank_among_that_colour():
    from experiments.demo_ablation import _match_by_colour

    reference = ["a large red star", "a small blue cross", "a small red square"]
    produced = ["a small blue cross", "a large red circle", "a small red square"]
    assert _match_by_colour(reference, produced) == ["a large red circle", "a small blue cross", "a small red square"]
    missing = _match_by_colour(["a small red star", "a small red cross"], ["a small red star"])
    assert missing == ["a small red star", None]


def test_a_box_covers_the_token_cells_it_fills_by_a_quarter():
    from experiments.demo_ablation import _cells_of_box

    # 64 px image, 4x4 grid of 16 px cells (a quarter of one: 64 px^2). [10, 0, 40, 19] covers 6 x 16 px of cell
    # (0, 0), all of (0, 1) and 8 x 16 px of (0, 2); of row 1 at most 16 x 3 px.
    cells = _cells_of_box([10, 0, 40, 19], image_side=64, grid=4).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0:3] = True
    assert torch.equal(cells, expected)


def test_each_stage_gets_the_schedule_and_stage_2_its_own_overrides(tmp_path, monkeypatch):
    import types

    import mmgem.demo as demo

    calls = []

    def fake_train(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(log_history=[], model=None, processor=None)

    monkeypatch.setattr(demo, "train", fake_train)
    config = demo.DemoConfig(
        min_learning_rate_ratio=0.25,
        vision_learning_rate_multiplier=3.0,
        train_overrides={"weight_decay": 0.0},
        stage2_train_overrides={"vision_learning_rate_multiplier": 0.5},
    )
    demo.train_stages(config, tmp_path / "train.jsonl", tmp_path)
    assert [call["stage"] for call in calls] == [1, 2]
    for call in calls:
        assert call["lr_scheduler_type"] == "cosine_with_min_lr"
        assert call["lr_scheduler_kwargs"] == {"min_lr_rate": 0.25}
        assert call["weight_decay"] == 0.0
    assert [call["vision_learning_rate_multiplier"] for call in calls] == [3.0, 0.5]


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_a_bad_minimum_learning_rate_ratio_fails_before_work(tmp_path, ratio):
    from mmgem.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match=r"`min_learning_rate_ratio` must be in \[0, 1\]"):
        run_demo(tmp_path / "out", DemoConfig(min_learning_rate_ratio=ratio))
    assert not (tmp_path / "out").exists()


def test_the_demo_decodes_its_captions_with_the_configured_beams(tmp_path, monkeypatch):
    import mmgem.demo as demo

    config = demo.DemoConfig(**{**demo.QUICK, "num_beams": 4})
    demo.prepare_data(config, tmp_path / "data")
    calls = []
    monkeypatch.setattr(demo, "evaluate_model", lambda *args, **kwargs: calls.append(kwargs))
    records, evaluate = demo.demo_evaluator(config, tmp_path / "data")
    evaluate(None, None)
    assert len(records) == config.num_test
    assert calls[0]["num_beams"] == 4 and calls[0]["max_new_tokens"] == config.max_new_tokens
    assert demo.DemoConfig().num_beams == 3
