"""The `mmgem` command: usage lines, help texts with defaults, one-line user errors, the subcommand registry."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmgem import cli
from mmgem.errors import DEBUG_VARIABLE, checking_user_input

REPO = Path(__file__).resolve().parents[1]


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _parser(name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(cli.COMMANDS[name].module)
    if name == "convert":
        return module.build_parser("mmgem convert")
    if name == "train":
        return module.build_parser(show_trainer_options=True)
    return module.build_parser()


@pytest.fixture()
def no_debug(monkeypatch):
    # `mmgem --debug` sets the variable for the whole process: monkeypatch restores it afterwards.
    monkeypatch.setenv(DEBUG_VARIABLE, "")


@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_usage_line_names_its_subcommand(capsys, name):
    assert _help(capsys, name).startswith(f"usage: mmgem {name} ")


@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_option_has_help_text_and_shows_its_default(name):
    parser = _parser(name)
    formatter = parser._get_formatter()
    assert isinstance(formatter, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.option_strings or action.dest}"
        shown = formatter._get_help_string(action)
        assert "default" in shown.lower() or not action.option_strings, f"{name}: {action.option_strings}"


@pytest.mark.fast
def test_train_help_shows_mmgem_options_grouped_and_points_to_the_trainer(capsys):
    text = _help(capsys, "train")
    titles = ["model:", "data:", "stages and losses:", "LoRA:", "training ("]
    positions = [text.index(f"\n{title}") for title in titles]
    assert positions == sorted(positions)
    assert "--help-trainer" in text and "--fsdp" not in text.split("\n\n")[-2]
    assert len(text.splitlines()) < 250
    assert cli.main(["train", "--help-trainer"]) == 0
    full = capsys.readouterr().out
    assert "--fsdp" in full and "--ddp_backend" in full and len(full.splitlines()) > len(text.splitlines())


@pytest.mark.fast
def test_user_mistakes_are_one_line_with_status_2(capsys, no_debug, tmp_path):
    cases = {
        "evaluate": ["--model", "m", "--data", str(tmp_path / "missing.jsonl")],
        "train": ["--model", "m", "--from-scratch", "tiny", "--data", "d", "--output-dir", str(tmp_path / "o")],
        "generate-data": ["--output-dir", str(tmp_path / "d"), "--num-train", "-1"],
        "demo": ["--threads", "0"],
    }
    for name, argv in cases.items():
        assert cli.main([name, *argv]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"mmgem {name}: error: ") and err.count("\n") == 1, err


@pytest.mark.fast
def test_debug_shows_the_traceback(no_debug, tmp_path):
    with pytest.raises(ValueError, match="`--data` does not exist"):
        cli.main(["--debug", "evaluate", "--model", "m", "--data", str(tmp_path / "missing.jsonl")])


def _hello(argv):
    print("hello", *argv)
    return 0


def _user_mistake(argv):
    with checking_user_input():
        raise FileNotFoundError(f"`--input` {argv[0]} does not exist\n  - and a second line")


def _bug(argv):
    raise ValueError("a bug, not a user mistake")


@pytest.mark.fast
def test_a_subcommand_is_one_registry_entry_and_errors_are_handled_centrally(capsys, monkeypatch, no_debug):
    monkeypatch.setitem(cli.COMMANDS, "hello", cli.Command("tests.test_cli:_hello", "say hello"))
    monkeypatch.setitem(cli.COMMANDS, "mistake", cli.Command("tests.test_cli:_user_mistake", "a user mistake"))
    monkeypatch.setitem(cli.COMMANDS, "bug", cli.Command("tests.test_cli:_bug", "a bug"))
    assert cli.main(["hello", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"
    assert "hello          say hello" in cli.usage()
    assert cli.main(["mistake", "x.txt"]) == 2
    assert capsys.readouterr().err == "mmgem mistake: error: `--input` x.txt does not exist; and a second line\n"
    with pytest.raises(ValueError, match="a bug"):  # not a user mistake: the traceback stays
        cli.main(["bug"])
    assert cli.main(["nope"]) == 2


def _run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # three fresh interpreters that import torch and transformers
def test_convert_entry_points(tmp_path):
    """The conversion runs as `mmgem convert`, as a module and as the console script."""
    as_subcommand = _run([sys.executable, "-m", "mmgem.cli", "convert", "--help"], REPO)
    assert as_subcommand.returncode == 0 and "--vision-model" in as_subcommand.stdout, as_subcommand.stderr
    as_module = _run([sys.executable, "-m", "mmgem.conversion.convert_mmgem", "--help"], REPO)
    assert as_module.returncode == 0 and as_module.stdout.startswith("usage: mmgem-convert"), as_module.stderr
    script = Path(sys.executable).parent / "mmgem-convert"
    if script.exists():
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        as_script = subprocess.run([str(script), "--help"], env=env, capture_output=True, text=True, timeout=300)
        assert as_script.returncode == 0 and as_script.stdout.startswith("usage: mmgem-convert")


@pytest.mark.fast
def test_train_options_files_missing_and_every_mmgem_option_in_a_help_group(tmp_path):
    from dataclasses import fields

    from mmgem.training.arguments import GROUP_OF, TRAINER_OPTIONS, MMGEMTrainingArguments, parse_arguments

    with pytest.raises(ValueError, match="`--args_file` .*missing.args does not exist"):
        parse_arguments(["--args_file", str(tmp_path / "missing.args")])
    options = tmp_path / "lr.args"
    options.write_text("--learning_rate 0.25 --max_steps 3\n")
    args = parse_arguments(["--args_file", str(options), "--max_steps", "7", "--output-dir", str(tmp_path / "o")])
    assert (args.learning_rate, args.max_steps) == (0.25, 7)  # flags after the file win
    own = {f.name for f in fields(MMGEMTrainingArguments) if f.init} - TRAINER_OPTIONS
    assert own <= set(GROUP_OF), f"MM-GEM options missing from `mmgem train --help`: {sorted(own - set(GROUP_OF))}"
