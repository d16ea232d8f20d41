"""The `mmgem` command: `train`, `evaluate`, `generate-data` and `demo` subcommands.

Each subcommand has its own options (`mmgem train --help`); the heavy imports happen only once a subcommand runs,
so `mmgem --help` is instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with a `main(argv)`, one-line description)
COMMANDS = {
    "train": ("mmgem.training.train", "train MM-GEM (stage 1 or 2, full or LoRA) with the HF Trainer"),
    "evaluate": ("mmgem.evaluation.evaluate", "retrieval, zero-shot, caption and region metrics on a .jsonl split"),
    "generate-data": ("mmgem.synthetic", "write the synthetic shapes dataset (train/val/test .jsonl)"),
    "demo": ("mmgem.demo", "the end-to-end demo: data, training from scratch, evaluation, export"),
    "index": ("mmgem.search.indexer", "embed an image folder or webdataset shards into a searchable index"),
    "search": ("mmgem.search.searcher", "search an index by text, image or image region"),
}


def usage() -> str:
    lines = ["usage: mmgem COMMAND [options]   (mmgem COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<14} {description}" for name, (_, description) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `mmgem COMMAND ...`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mmgem: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
