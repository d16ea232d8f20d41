"""The experiments harness (`python -m experiments.run`): a micro run writes the report with every arm, and the pieces
the claims rely on behave as the report says (zero-weighted losses give no gradient, CLIP reads 77 tokens, verdicts).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments.clip_baseline import CLIP_CONTEXT, ClipProcessor, build_clip
from experiments.report import HELD, NOT_HELD, UNCLEAR, Stat, verdict_long, verdict_objectives
from experiments.run import main
from experiments.settings import BUDGETS, arms_for, experiment_architecture, pool_grids, tasks_for
from mmgem.build import DEFAULT_CORPUS, tiny_mmgem


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """One micro run of the whole harness (every arm, tiny model, a few steps)."""
    folder = tmp_path_factory.mktemp("experiments")
    argv = [
        "--budget",
        "micro",
        "--output-dir",
        str(folder / "work"),
        "--report-dir",
        str(folder / "report"),
        "--no-progress",
        "--jobs",
        "1",
    ]
    assert main(argv) == 0
    return folder


def test_micro_run_reports_every_arm(micro_run):
    report = (micro_run / "report" / "REPORT.md").read_text()
    spec = experiment_architecture("tiny")
    for arm in arms_for(spec):
        assert arm.label in report, arm.name
    for figure in ("claim1_objectives", "claim1_losses", "claim2_pool", "claim3_stages", "claim4_long"):
        path = micro_run / "report" / "figures" / f"{figure}.png"
        assert path.is_file() and path.stat().st_size > 1000
        assert f"figures/{figure}.png" in report
    for verdict_heading in ("## Claim 1", "## Claim 2", "## Claim 3", "## Claim 4", "## Verdict rules"):
        assert verdict_heading in report
    assert "python -m experiments.run --budget micro" in report
    summary = json.loads((micro_run / "report" / "results.json").read_text())
    seeds = len(BUDGETS["micro"].seeds)
    for arm in arms_for(spec):
        stats = summary["aggregate"][arm.name]
        key = "retrieval/R@1"
        assert stats[key]["n"] == seeds, arm.name
    assert set(summary["verdicts"]) == {"objectives", "pool", "stages", "long"}


def test_rerun_reuses_results(micro_run):
    """A second run with the same settings trains nothing and reports the first run's command and times."""
    results = sorted((micro_run / "work" / "results").rglob("*.json"))
    stamps = [path.stat().st_mtime_ns for path in results]
    first = json.loads((micro_run / "report" / "results.json").read_text())
    argv = [
        "--budget",
        "micro",
        "--output-dir",
        str(micro_run / "work"),
        "--report-dir",
        str(micro_run / "again"),
        "--no-progress",
        "--jobs",
        "1",
    ]
    assert main(argv) == 0
    assert [path.stat().st_mtime_ns for path in results] == stamps
    summary = json.loads((micro_run / "again" / "results.json").read_text())
    assert summary["regenerated"]["command"].endswith("--jobs 1") and "again" in summary["regenerated"]["command"]
    assert summary["wall_s"] == first["wall_s"] and summary["command"] == first["command"]
    assert "regenerated from that run's saved results" in (micro_run / "again" / "REPORT.md").read_text()


def test_tasks_cover_arms_once_per_seed():
    spec = experiment_architecture("demo")
    assert pool_grids(spec) == [1, 2, 4, 8]
    tasks = tasks_for(BUDGETS["full"], spec)
    keys = [t.key for t in tasks]
    assert len(keys) == len(set(keys))
    assert len(tasks) == 3 * (1 + 2 + 3 + 1)  # core, two single objectives, three other grids, CLIP


@pytest.mark.parametrize("zeroed", ["caption_loss_weight", "contrastive_loss_weight"])
def test_zero_weighted_loss_gives_no_gradient(zeroed, images):
    """A weight of 0 removes the term from the gradient exactly: the arms of claim 1 train one objective only."""
    kept = "loss_contrastive" if zeroed == "caption_loss_weight" else "loss_caption"
    torch.manual_seed(0)
    model, processor = tiny_mmgem(**{zeroed: 0.0})
    batch = processor(images=images, text=["a small red circle", "a large blue star", "a red square", "a star"])
    model.train()
    output = model(**batch)
    output.loss.backward()
    with_zero = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    getattr(model(**batch), kept).backward()
    for name, parameter in model.named_parameters():
        expected = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        assert torch.equal(with_zero.get(name, torch.zeros_like(parameter)), expected), name


def test_clip_baseline_reads_77_tokens():
    spec = experiment_architecture("tiny", vocab_size=320)
    long_text = " ".join(DEFAULT_CORPUS[:40])
    model, processor = build_clip(spec, [long_text, *DEFAULT_CORPUS])
    assert isinstance(processor, ClipProcessor)
    batch = processor(text=[long_text, "a small red circle"])
    assert batch["input_ids"].shape[1] == CLIP_CONTEXT
    assert batch["input_ids"][0, -1] == processor.eot_token_id  # cut texts still end with CLIP's end token
    assert model.config.text_config.max_position_embeddings == CLIP_CONTEXT
    assert model.config.text_config.eos_token_id == processor.eot_token_id != 2  # first-<eot> pooling, not argmax
    with torch.no_grad():
        features = model.get_text_features(**batch).pooler_output
    assert features.shape == (2, spec["projection_dim"])


def test_verdict_rules():
    def arm(retrieval, cider):
        return {"retrieval/R@1": Stat(retrieval), "caption/cider": Stat(cider)}

    same = {
        "joint": arm([0.80, 0.82, 0.81], [3.0, 3.1, 2.9]),
        "embedding_only": arm([0.81, 0.80, 0.82], [0.0, 0.0, 0.0]),
        "caption_only": arm([0.01, 0.02, 0.01], [3.0, 3.0, 3.1]),
    }
    assert verdict_objectives(same)[0] == HELD
    worse = dict(same, joint=arm([0.50, 0.52, 0.51], [3.0, 3.1, 2.9]))
    assert verdict_objectives(worse)[0] == NOT_HELD
    one_seed = {k: {m: Stat(s.values[:1]) for m, s in v.items()} for k, v in same.items()}
    assert verdict_objectives(one_seed)[0] == UNCLEAR

    def long(ours, clip):
        return {"long_mild_mmgem": {"retrieval/R@1": Stat(ours)}, "long_mild_clip": {"retrieval/R@1": Stat(clip)}}

    assert verdict_long(long([0.6, 0.62, 0.61], [0.3, 0.31, 0.3]), ["mild"])[0] == HELD
    assert verdict_long(long([0.3, 0.31, 0.3], [0.3, 0.32, 0.31]), ["mild"])[0] == NOT_HELD
    assert math.isnan(Stat([1.0]).std)


def test_objectives_only_run_trains_the_three_claim_1_arms(tmp_path):
    assert (
        main(
            [
                "--budget",
                "micro",
                "--only-objectives",
                "--steps-scale",
                "2",
                "--jobs",
                "1",
                "--output-dir",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "objectives.json").read_text())
    assert summary["budget"]["steps"] == 2 * BUDGETS["micro"].steps
    assert set(summary["results"]) == {"joint", "embedding_only", "caption_only"}
    for per_seed in summary["results"].values():
        assert set(per_seed) == {"0"} and all("caption/cider" in r and "retrieval/R@1" in r for r in per_seed.values())
    with pytest.raises(ValueError, match="only-objectives"):
        main(["--budget", "micro", "--steps-scale", "2"])
