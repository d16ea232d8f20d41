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


def test_a_committed_demo_run_is_shown(checkout):
    metrics = {key: 0.9 for key in results.TARGETS}
    (checkout / results.DEMO_METRICS).write_text(json.dumps(metrics))
    assert "| measured | 0.900 | 0.900 | 0.900 | 0.900 | 0.900 |" in results.results_page(checkout)


def test_the_readme_needs_its_markers():
    with pytest.raises(ValueError, match="results"):
        results.update_readme("# a README without markers\n", "| table |")


def test_durations_read_as_people_write_them():
    assert [results._duration(s) for s in (0.000402, 0.0931, 14.53, 375.0)] == ["402 us", "93.1 ms", "14.5 s", "375 s"]
