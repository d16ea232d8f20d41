"""User mistakes on the `mmgem` command line: one line that names the flag and what was expected, exit status 2, no
traceback (`mmgem --debug` shows it); `--model` is checked as a local path before it is taken for a repo id."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmgem import cli
from mmgem.synthetic import generate_dataset
from mmgem.training.train import saved_message

from .outside import run_cli

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = generate_dataset(root / "data", num_train=2, num_val=1, num_test=1, image_size=32)
    good = root / "data" / "train.jsonl"
    bad = root / "bad.jsonl"
    first = json.loads(good.read_text().splitlines()[0])
    bad.write_text(json.dumps(first) + "\nnot json\n")
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    CLIPVisionModel(config).save_pretrained(root / "clip")
    return {"root": root, "good": good, "bad": bad, "clip": root / "clip", "paths": paths}


def _mistake(capsys, monkeypatch, argv: list[str]) -> str:
    monkeypatch.delenv("MMGEM_DEBUG", raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"mmgem {argv[0]}: error: "), err
    return err


def test_each_mistake_is_one_line_naming_its_flag(files, capsys, monkeypatch, tmp_path):
    good, bad, clip = str(files["good"]), str(files["bad"]), str(files["clip"])
    out = str(tmp_path / "out")
    err = _mistake(capsys, monkeypatch, ["evaluate", "--model", "/nonexistent/model", "--data", good])
    assert "`--model`" in err and "no such folder" in err and "repo id" in err  # not the Hub's repo-id rules
    err = _mistake(capsys, monkeypatch, ["evaluate", "--model", clip, "--data", good])
    assert "`--model`" in err and "not an MM-GEM model" in err and "clip_vision_model" in err
    err = _mistake(capsys, monkeypatch, ["train", "--from-scratch", "tiny", "--data", str(tmp_path / "no.jsonl"),
                                         "--output-dir", out])  # fmt: skip
    assert "`--data`" in err and "`data`" not in err
    err = _mistake(capsys, monkeypatch, ["train", "--from-scratch", "tiny", "--data", bad, "--output-dir", out])
    assert err.startswith(f"mmgem train: error: `--data` {bad}") and "line 2" in err
    err = _mistake(capsys, monkeypatch, ["train", "--from-scratch", "nope", "--data", good, "--output-dir", out])
    assert "`--from-scratch`" in err and "tiny" in err and "from_scratch" not in err
    err = _mistake(capsys, monkeypatch, ["generate-data", "--output-dir", str(files["root"] / "data")])
    assert "--overwrite" in err and "overwrite=True" not in err
    err = _mistake(capsys, monkeypatch, ["export-onnx", "--model", "./missing-folder"])
    assert "`--model`" in err and "no such folder" in err
    err = _mistake(capsys, monkeypatch, ["export-onnx", "--model", clip])
    assert "`--model`" in err and "not an MM-GEM model" in err


def test_as_typed_one_line_and_debug_shows_the_traceback(files, tmp_path):
    argv = ["train", "--from-scratch", "nope", "--data", str(files["good"]), "--output-dir", str(tmp_path / "o")]
    plain = run_cli(*argv, cwd=tmp_path)
    assert plain.returncode == 2 and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    debug = run_cli("--debug", *argv, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "from_scratch" in debug.stderr


def test_no_merge_lora_says_where_the_adapter_is(tmp_path):
    message = saved_message(SimpleNamespace(lora=True, merge_lora=False), tmp_path)
    assert (
        str(tmp_path / "lora_adapter") in message
        and "--no-merge-lora" in message
        and "Saved the trained" not in message
    )
    assert saved_message(SimpleNamespace(lora=False, merge_lora=True), tmp_path).endswith(str(tmp_path))
