"""The `mmgem` command: one subcommand per task (`mmgem --help` lists them, `mmgem COMMAND --help` their options).

Adding a subcommand is one entry in `COMMANDS`: `"name": Command("package.module", "one-line description")`. The
module provides `main(argv) -> int` (or another function, named as `"package.module:function"`) and, for the
help and its tests, `build_parser()`; `command_parser(name, description)` gives a parser whose usage line reads
`mmgem NAME` and whose help shows every option's default. The module is imported only when its subcommand runs,
so `mmgem --help` is instant.

Errors: a user mistake (an `mmgem.errors.MMGEMUserError`, or a `ValueError` / `FileNotFoundError` raised while the
options and inputs are checked, see `mmgem.errors.checking_user_input`) is printed as one line
`mmgem COMMAND: error: ...` with exit status 2; `mmgem --debug COMMAND ...` (or `MMGEM_DEBUG=1`) shows the traceback.
Anything else is a failure and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmgem.errors import DEBUG_VARIABLE, debug_requested, is_user_error, one_line


@dataclass(frozen=True)
class Command:
    """A subcommand: `target` is `"package.module"` (its `main(argv)` runs) or `"package.module:function"`."""

    target: str
    description: str

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def load(self) -> Callable[[list[str]], int | None]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function or "main")


COMMANDS: dict[str, Command] = {
    "train": Command("mmgem.training.train", "train MM-GEM (stage 1 or 2, full or LoRA) with the HF Trainer"),
    "evaluate": Command("mmgem.evaluation.evaluate", "retrieval, zero-shot, caption and region metrics on a split"),
    "generate-data": Command("mmgem.synthetic", "write the synthetic shapes dataset (train/val/test .jsonl)"),
    "demo": Command("mmgem.demo", "the end-to-end demo: data, training from scratch, evaluation, export"),
    "convert": Command("mmgem.conversion.convert_mmgem:mmgem_main", "compose, export and publish an MM-GEM Hub folder"),
    "export-onnx": Command(
        "mmgem.conversion.export_onnx", "write text_model.onnx / vision_model.onnx (checked with onnxruntime)"
    ),
    "index": Command("mmgem.search.indexer", "embed an image folder or webdataset shards into a searchable index"),
    "search": Command("mmgem.search.searcher", "search an index by text, image or image region"),
    "embed": Command("mmgem.scale.ray_embed", "embed (and caption) an image collection on Ray Data with actor pools"),
    "app": Command("mmgem.app.gradio_app", "a web app to try a model: captions, zero-shot labels, regions, search"),
}
DEBUG_FLAG = "--debug"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and `(default: ...)` after every option whose help does not already give it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text.lower():
            return help_text
        return super()._get_help_string(action)


def command_parser(name: str, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """The argument parser of `mmgem NAME` (usage line `usage: mmgem NAME ...`, defaults shown in the help)."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    return argparse.ArgumentParser(prog=f"mmgem {name}", description=description, **kwargs)


def usage() -> str:
    lines = [
        f"usage: mmgem [{DEBUG_FLAG}] COMMAND [options]   (mmgem COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<14} {command.description}" for name, command in COMMANDS.items()]
    lines += ["", f"{DEBUG_FLAG}: show the full traceback of an error (also MMGEM_DEBUG=1)"]
    return "\n".join(lines)


def run_command(name: str, argv: Sequence[str], debug: bool = False) -> int:
    """Run subcommand `name`: a user mistake becomes one line on stderr and exit status 2 (unless `debug`)."""
    try:
        return int(COMMANDS[name].load()(list(argv)) or 0)
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        message = in_cli_terms(one_line(error), command_flags(name), argv)
        print(f"mmgem {name}: error: {message}", file=sys.stderr)
        return 2


def command_flags(name: str) -> list[str]:
    """The long options of subcommand `name` as typed (`--from-scratch`), from its module's `build_parser()`."""
    module = importlib.import_module(COMMANDS[name].module)
    build_parser = getattr(module, "build_parser", None)
    if build_parser is None:
        return []
    try:
        parser = build_parser()
    except Exception:  # a parser that cannot be built must not hide the user's error
        return []
    flags = []
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        dashed = [o for o in long if "_" not in o]
        flags += dashed[:1] or long[:1]
    return flags


def in_cli_terms(message: str, flags: Sequence[str], argv: Sequence[str]) -> str:
    """A user-error message in the words of the command line: the library names parameters (`from_scratch`,
    "pass overwrite=True"), the user typed flags (`--from-scratch`, `--overwrite`). A message that names no flag but
    starts with the value the user gave a flag (a data file's bad records) gets that flag in front."""
    for flag in flags:
        parameter = flag[2:].replace("-", "_")
        message = message.replace(f"`{parameter}`", f"`{flag}`")
        message = re.sub(rf"(?<![\w-]){re.escape(parameter)}=True\b", flag, message)
    if not any(flag in message for flag in flags):
        for flag, value in zip(argv, argv[1:]):
            if flag in flags and value and message.startswith(value):
                return f"`{flag}` {message}"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run `mmgem [--debug] COMMAND ...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv and argv[0] == DEBUG_FLAG:
        os.environ[DEBUG_VARIABLE] = "1"  # for the commands that report their own errors (mmgem convert)
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mmgem: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_command(command, rest, debug_requested())


if __name__ == "__main__":
    raise SystemExit(main())
