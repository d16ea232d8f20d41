"""docs/results.md and the README's results table are generated from the committed JSON (`python -m mmgem.results`)
and must equal what the generator writes from it: a number edited by hand, or JSON committed without regenerating,
fails here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmgem import results
from tests.outside import REPO_ROOT


def test_the_committed_results_page_and_readme_table_are_generated():
    assert results.outdated(REPO_ROOT) == [], "run `python -m mmgem.results` and commit docs/results.md, README.md"


@pytest.fixture()
def checkout(tmp_path) -> Path:
    """The files the generator reads and writes, copied into a scratch checkout."""
    paths = [
        results.PAGE,
        results.README,
        results.DEMO_CURVE,
        results.EXPERIMENTS,
        results.CLAIM1_X4,
        *results.BENCHMARKS,
    ]
    for path in paths:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / path, tmp_path / path)
    return tmp_path


def test_a_changed_number_makes_both_stale_and_regenerating_fixes_them(checkout):
    curve = json.loads((checkout / results.DEMO_CURVE).read_text())
    curve[-1]["zero_shot/accuracy"] = 0.925
    (checkout / results.DEMO_CURVE).write_text(json.dumps(curve))
    assert results.outdated(checkout) == [results.PAGE, results.README]
    assert results.main(["--root", str(checkout), "--check"]) == 1
    assert results.main(["--root", str(checkout)]) == 0
    assert results.outdated(checkout) == []
    page = (checkout / results.PAGE).read_text()
    assert "| 3,250 (stage 2) | 0.955 | 0.935 | 0.925 | 0.956 | 0.360 |" in page
    assert "zero-shot 0.925" in (checkout / results.README).read_text()
    assert "4 of 5 targets met" in (checkout / results.README).read_text()


def test_committed_demo_runs_and_ablation_are_shown(checkout):
    metrics = {key: 0.9 for key in results.TARGETS}
    seeds = {
        "command": "python -m mmgem.demo --seed S",
        "eval_split": "test",
        "wall_time_target_s": 600.0,
        "machine": "x86_64, 2 CPU cores",
        "runs": [{"seed": 1, "metrics": metrics, "targets_met": True, "process_wall_s": 512.4, "timings": {}}],
    }
    (checkout / results.DEMO_SEEDS).write_text(json.dumps(seeds))
    diagnosis = {
        "zero_shot": {"colour wrong": 0, "shape wrong": 7, "images": 60},
        "caption_exact_match_by_objects": {"1": 0.55, "2": 0.25},
        "multi_object_captions": {
            "colour_order_right": 0.5,
            "shape_right": 0.25,
            "size_right": 0.75,
            "shapes_right_as_a_set": 0.6,
        },
        "first_object_right_by_leftmost_size": {"small": 0.3, "large": 0.8},
        "large_object_first_when_leftmost_small": 0.9,
        "binding": {
            "objects": 120,
            "shape_right_given_previous_words": 0.55,
            "attention_on_object": 0.13,
            "attention_on_other_object": 0.12,
            "layer": 0,
        },
    }
    variant = {"name": "base", "change": "nothing", "metrics": metrics, "training_cpu_s": 600.0, "diagnosis": diagnosis}
    variant["config"] = {"single_object_fraction": 0.3}
    binding = {**diagnosis["binding"], "attention_on_object": 0.3, "attention_on_other_object": 0.05}
    better = {**variant, "name": "kept_up", "change": "lr kept up", "diagnosis": {**diagnosis, "binding": binding}}
    (checkout / results.DEMO_ABLATION).write_text(json.dumps({"variants": [variant, better]}))
    page = results.results_page(checkout)
    assert "| seed 1 | 0.900 | 0.900 | 0.900 | 0.900 | 0.900 | yes | 512 s |" in page
    assert "| base | nothing | 0.900 | 0.900 | 0.900 | 0.900 | 0.900 | 10 min |" in page
    assert (
        "| base | 0 / 7 of 60 | 1: 0.55, 2: 0.25 | 0.50 | 0.25 | 0.75 | 0.60 | 0.13 / 0.12 | 0.55 | 0.30 / 0.80 |"
        in page
    )
    first = "starts with the leftmost object 0.80 of the time when that object is large and 0.30 when it is small; "
    assert first in page
    assert "that object is large 0.90 of the time: the caption starts with the object that stands out" in page
    assert "puts 0.13 of its attention on that object's visual tokens and 0.12 on the other object's" in page
    assert "singles out the object most is `kept_up` (lr kept up): 0.30 of its attention on the object and 0.05" in page
    assert "Its attention does not single out the object it describes" in page
    # A reference variant that does single it out is described as such, and no other variant is named as better.
    (checkout / results.DEMO_ABLATION).write_text(json.dumps({"variants": [better, variant]}))
    page = results.results_page(checkout)
    assert "Its attention singles out the object it describes, so the shape it names is read from that object." in page
    assert "does not single out" not in page and "singles out the object most" not in page
    assert "30% of the images hold one object: exact match reaches 0.5 only once at least 29% of the captions" in page
    assert "| `make demo`, 1 seed (test split) | every target met in time by 1 of 1; 8.5 min;" in results.readme_table(
        checkout
    )


def test_the_readme_needs_its_markers():
    with pytest.raises(ValueError, match="results"):
        results.update_readme("# a README without markers\n", "| table |")


def test_durations_read_as_people_write_them():
    assert [results._duration(s) for s in (0.000402, 0.0931, 14.53, 375.0)] == ["402 us", "93.1 ms", "14.5 s", "375 s"]
