"""User mistakes on the `mmgem` command line: one line that names the flag and what was expected, exit status 2, no
traceback (`mmgem --debug` shows it); `--model` is checked as a local path before it is taken for a repo id.

`MISTAKES` is the table of the train / evaluate / generate-data / convert mistakes found by the audits (the index,
search, app and export-onnx ones are in tests/test_cli_mistakes_search.py); each row runs the subcommand and fails on
a traceback, an exit status other than 2, more than one line, or a line that lacks the flag or the fix."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from mmgem import cli
from mmgem.build import tiny_mmgem
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
    (root / "empty.jsonl").write_text("")
    outside = [json.dumps({"image": f"../../{'deep/' * 30}{i}.png", "caption": "c"}) for i in range(20)]
    (root / "data" / "outside.jsonl").write_text("\n".join([json.dumps(first), *outside]) + "\n")
    (root / "no-metadata" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "no-metadata" / "images" / "a.png")
    model, processor = tiny_mmgem()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    shutil.copytree(root / "model", root / "reshaped")
    weights = load_file(root / "reshaped" / "model.safetensors")
    weights["language_model.model.embed_tokens.weight"] = torch.zeros(3, 3)
    save_file(weights, root / "reshaped" / "model.safetensors", metadata={"format": "pt"})
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
    err = _mistake(
        capsys,
        monkeypatch,
        ["train", "--from-scratch", "tiny", "--data", str(tmp_path / "no.jsonl"), "--output-dir", out],
    )
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


TRAIN = ["train", "--from-scratch", "tiny", "--data", "{good}", "--output-dir", "{out}"]
# (argv with {placeholders}, words the one line must hold); a row for each mistake the audits found.
MISTAKES = [
    (
        ["train", "--model", "nonexistent_dir", "--data", "{good}", "--output-dir", "{out}"],
        ["`--model` nonexistent_dir", "no such folder"],
    ),
    (["evaluate", "--model", "nonexistent_dir", "--data", "{good}"], ["`--model` nonexistent_dir", "no such folder"]),
    (["evaluate", "--model", "{root}/model", "--data", "{root}/empty.jsonl"], ["`--data`", "no record"]),
    (["evaluate", "--model", "{root}/model"], ["`--data` is required"]),
    (["evaluate", "--model", "{root}/model", "--data", "{root}/none.jsonl"], ["`--data` does not exist"]),
    (["evaluate", "--model", "{root}/model", "--data", "{good}", "--batch-size", "0"], ["`--batch-size`"]),
    (
        ["evaluate", "--model", "{root}/reshaped", "--data", "{good}"],
        ["`--model`", "embed_tokens.weight is [3, 3]", "config.json"],
    ),
    (["evaluate", "--model", "{root}/model", "--data", "{bad}"], ["`--data`", "line 2"]),
    (
        ["train", "--model", "{root}/reshaped", "--data", "{good}", "--output-dir", "{out}"],
        ["`--model`", "embed_tokens.weight is [3, 3]"],
    ),
    (["train", "--from-scratch", "tiny", "--data", "{good}"], ["`--output-dir` is required"]),
    ([*TRAIN, "--stage", "2", "--max-regions-per-image", "-1"], ["`--max-regions-per-image`", "positive int"]),
    ([*TRAIN, "--stage", "3"], ["`--stage`", "1 or 2"]),
    ([*TRAIN, "--data-on-error", "ignore"], ["`--data-on-error`", "skip"]),
    ([*TRAIN, "--data-format", "csv"], ["`--data-format`", "webdataset"]),
    ([*TRAIN, "--data-weights", "a"], ["`--data-weights`", "numbers"]),
    ([*TRAIN, "--model", "{root}/model"], ["`--model`", "`--from-scratch`"]),
    ([*TRAIN, "--shuffle-buffer", "-1"], ["`--shuffle-buffer`", ">= 0"]),
    ([*TRAIN, "--train-num-samples", "0"], ["`--train-num-samples`", "positive"]),
    ([*TRAIN, "--lora-vision", "maybe"], ["`--lora-vision`", "'lora'"]),
    (
        ["train", "--from-scratch", "tiny", "--data", "{root}/empty.jsonl", "--output-dir", "{out}"],
        ["`--data`", "no usable record"],
    ),
    (
        [
            "train",
            "--from-scratch",
            "tiny",
            "--data",
            "{root}/no-metadata",
            "--data-format",
            "imagefolder",
            "--output-dir",
            "{out}",
        ],
        ["no metadata.jsonl", "file_name"],
    ),
    (
        ["train", "--from-scratch", "tiny", "--data", "{root}/data/outside.jsonl", "--output-dir", "{out}"],
        ["outside.jsonl: 20 of 21 records", "... and 17 more", "--allow-outside-data-root"],
    ),
    (["generate-data", "--output-dir", "{root}/data"], ["--overwrite"]),
    (["convert", "--from-checkpoint", "{root}/none", "--output-dir", "{out}"], ["`--from-checkpoint`", "saved MM-GEM"]),
    (
        ["convert", "--from-checkpoint", "{root}/model", "--output-dir", "{root}/data"],
        ["`--output-dir`", "--overwrite"],
    ),
]


MISTAKE_IDS = [
    "train --model bare name",
    "evaluate --model bare name",
    "evaluate empty --data",
    "evaluate without --data",
    "evaluate missing --data",
    "evaluate --batch-size 0",
    "evaluate weights of other shapes",
    "evaluate bad --data",
    "train weights of other shapes",
    "train without --output-dir",
    "train --max-regions-per-image -1",
    "train --stage 3",
    "train --data-on-error ignore",
    "train --data-format csv",
    "train --data-weights a",
    "train --model and --from-scratch",
    "train --shuffle-buffer -1",
    "train --train-num-samples 0",
    "train --lora-vision maybe",
    "train empty --data",
    "train imagefolder without metadata.jsonl",
    "train 20 records outside the data root",
    "generate-data existing --output-dir",
    "convert missing --from-checkpoint",
    "convert existing --output-dir",
]


@pytest.mark.parametrize("argv, words", MISTAKES, ids=MISTAKE_IDS)
def test_mistakes_table(files, capsys, monkeypatch, tmp_path, argv, words):
    values = {"root": files["root"], "good": files["good"], "bad": files["bad"], "out": tmp_path / "out"}
    argv = [a.format(**{k: str(v) for k, v in values.items()}) for a in argv]
    err = _mistake(capsys, monkeypatch, argv)
    assert all(w in err for w in words), err
    assert len(err) < 1200, f"{len(err)} characters: {err[:300]}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "trainer_output").exists()


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


def test_measure_peak_rss_usage_names_its_own_command(capsys):
    from benchmarks.measure_peak_rss import run

    with pytest.raises(SystemExit):
        run(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m benchmarks.measure_peak_rss")


def test_a_repo_id_the_hub_cannot_give_is_one_line(monkeypatch):
    from mmgem import loading
    from mmgem.errors import is_user_error

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading.MMGEMProcessor, "from_pretrained", unreachable)
    with pytest.raises(ValueError, match=r"`--model` org/missing: no such folder, and no MM-GEM repo") as error:
        loading.load_model("org/missing", argument="--model")
    assert is_user_error(error.value) and "couldn't connect" in str(error.value)
