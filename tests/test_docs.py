"""Documentation that cannot drift: every fenced ```python / ```bash block of README.md and of every docs page runs
here, on a tiny random model, and the repository paths, dotted names and `mmgem` subcommands the text mentions exist.

The convention (also written in docs/development.md):
- Each page runs in one fresh temporary folder holding `tiny-model/` (a tiny random MM-GEM saved with its processor,
  `tests.outside.saved_tiny_folder`) and `images/0.png`, `images/1.png`, `images/2.png`.
- The page's blocks run in order; its python blocks share one namespace; bash blocks run with `bash -e`, with this
  checkout's `mmgem` / `mmgem-convert` / `python` on the PATH.
- A block that cannot run there (a GPU, the network, hours, a server) is preceded by the line
  `<!-- docs-test: skip: REASON -->`, with a reason. ```text / ```json / ```yaml blocks are not run.
A failure names the page and the line where its block starts.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmgem.cli import COMMANDS, command_flags
from tests.outside import REPO_ROOT, saved_tiny_folder

RUN_LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
SKIP_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*skip:(?P<reason>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+)\s*(?P<lang>[\w+-]*)\s*$")
BASH_TIMEOUT_S = 300


def doc_pages() -> list[Path]:
    """README.md and every Markdown page under docs/, as paths relative to the repository root."""
    pages = [Path("README.md")] + sorted(p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "docs").rglob("*.md"))
    return [p for p in pages if (REPO_ROOT / p).is_file()]


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str  # as written after the fence ("" when none)
    source: str
    skip_reason: str | None  # None: run it; "": marked without a reason (an error)

    @property
    def runner(self) -> str | None:
        return RUN_LANGUAGES.get(self.language.lower())

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def parse_blocks(text: str, page: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown text, and the problems of its markup (an unclosed fence, a block without a
    language, a skip marker that no block follows)."""
    blocks, problems = [], []
    lines = text.splitlines()
    pending_skip: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        marker = SKIP_MARKER.match(lines[i])
        if marker:
            if pending_skip:
                problems.append(f"{page}:{pending_skip[0]}: a skip marker followed by another one")
            pending_skip = (i + 1, marker.group("reason").strip())
        elif match:
            indent, fence, language = match.group("indent"), match.group("fence"), match.group("lang")
            body, j = [], i + 1
            while j < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[j]):
                body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
                j += 1
            if j == len(lines):
                problems.append(f"{page}:{i + 1}: a code fence that is never closed")
            if not language:
                problems.append(f"{page}:{i + 1}: a code block without a language (```python, ```bash, ```text...)")
            skip = pending_skip[1] if pending_skip else None
            if pending_skip and RUN_LANGUAGES.get(language.lower()) is None:
                problems.append(f"{page}:{pending_skip[0]}: a skip marker before a ```{language} block (never run)")
            blocks.append(Block(page, i + 1, language, "\n".join(body) + "\n", skip))
            pending_skip = None
            i = j
        elif lines[i].strip() and pending_skip:
            problems.append(f"{page}:{pending_skip[0]}: a skip marker not followed by a code block")
            pending_skip = None
        i += 1
    if pending_skip:
        problems.append(f"{page}:{pending_skip[0]}: a skip marker not followed by a code block")
    return blocks, problems


def page_blocks(page: Path) -> list[Block]:
    return parse_blocks((REPO_ROOT / page).read_text(encoding="utf-8"), page)[0]


ALL_BLOCKS = [block for page in doc_pages() for block in page_blocks(page) if block.runner]


# ------------------------------------------------------------------------------------------------ the parser's tests
def test_parser_finds_blocks_languages_and_skip_reasons():
    text = "\n".join(
        [
            "# t",
            "```python",
            "x = 1",
            "```",
            "",
            "<!-- docs-test: skip: needs a GPU -->",
            "```bash",
            "nvidia-smi",
            "```",
            "- item",
            "  ```bash",
            "  echo indented",
            "  ```",
            "```text",
            "not run",
            "```",
        ]
    )
    blocks, problems = parse_blocks(text, Path("p.md"))
    assert problems == []
    assert [(b.line, b.runner, b.skip_reason) for b in blocks] == [
        (2, "python", None),
        (7, "bash", "needs a GPU"),
        (11, "bash", None),
        (14, None, None),
    ]
    assert blocks[2].source == "echo indented\n"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("```\nx\n```", "without a language"),
        ("```python\nx = 1\n", "never closed"),
        ("<!-- docs-test: skip: why -->\nsome prose", "not followed by a code block"),
        ("<!-- docs-test: skip: why -->\n```text\nx\n```", "never run"),
    ],
)
def test_parser_reports_bad_markup(text, problem):
    assert any(problem in p for p in parse_blocks(text, Path("p.md"))[1])


def test_a_skip_without_a_reason_is_read_as_empty():
    (block,) = parse_blocks("<!-- docs-test: skip: -->\n```bash\nls\n```", Path("p.md"))[0]
    assert block.skip_reason == ""


# --------------------------------------------------------------------------------------------- markup of every page
def test_the_readme_stays_short():
    # Usage first, the rest on the documentation site: the README is a front page, not a lab notebook.
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail to a page under docs/"


@pytest.mark.parametrize("page", [str(p) for p in doc_pages()])
def test_page_markup(page):
    blocks, problems = parse_blocks((REPO_ROOT / page).read_text(encoding="utf-8"), Path(page))
    problems += [f"{b.name}: a skip marker needs a reason after 'skip:'" for b in blocks if b.skip_reason == ""]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------- running blocks
@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    return saved_tiny_folder(tmp_path_factory.mktemp("docs-model") / "tiny-model")


def write_images(folder: Path) -> None:
    """Three small RGB PNGs of different sizes: a plain colour with a darker rectangle on it."""
    folder.mkdir()
    rng = np.random.RandomState(0)
    for index, (width, height) in enumerate(((64, 48), (48, 64), (56, 56))):
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[:] = rng.randint(120, 255, 3)
        pixels[height // 4 : height // 2, width // 4 : 3 * width // 4] = rng.randint(0, 120, 3)
        Image.fromarray(pixels).save(folder / f"{index}.png")


class PageRun:
    """One page's temporary folder, python namespace, and the first failure (later blocks are not run)."""

    def __init__(self, folder: Path, tiny_model: Path):
        self.folder = folder
        shutil.copytree(tiny_model, folder / "tiny-model")
        write_images(folder / "images")
        self.namespace: dict = {"__name__": "__docs__"}
        self.failed: str | None = None


@pytest.fixture(scope="module")
def page_runs():
    return {}


CONSOLE_SCRIPT = re.compile(r"""["']([\w-]+)\s*=\s*([\w.]+):(\w+)["']""")


def console_scripts(bin_folder: Path) -> Path:
    """The commands `setup.py` declares (`mmgem`, `mmgem-convert`), as this checkout defines them: an installed
    script could be older than the checkout (an editable install made before an entry point moved)."""
    section = (REPO_ROOT / "setup.py").read_text(encoding="utf-8").split("console_scripts", 1)[1].split("]", 1)[0]
    bin_folder.mkdir(exist_ok=True)
    for name, module, function in CONSOLE_SCRIPT.findall(section):
        script = bin_folder / name
        script.write_text(
            f"#!/bin/sh\nexec {sys.executable} -c 'import sys; from {module} import {function}; "
            f'sys.argv[0] = "{name}"; sys.exit({function}())\' "$@"\n'
        )
        script.chmod(0o755)
    return bin_folder


def page_environment(folder: Path) -> dict[str, str]:
    """What a user's shell has after `source .venv/bin/activate`: the project's commands and this interpreter's
    `python` first on the PATH."""
    env = dict(os.environ)
    scripts = console_scripts(folder / ".bin")
    env["PATH"] = os.pathsep.join([str(scripts), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(folder / ".hf_home"),
            "TOKENIZERS_PARALLELISM": "false",
            "MPLBACKEND": "Agg",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def run_python(block: Block, run: PageRun) -> None:
    # Blank lines in front so that a traceback's line numbers are the page's.
    code = compile("\n" * block.line + block.source, str(REPO_ROOT / block.page), "exec")
    previous = os.getcwd()
    os.chdir(run.folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, run.namespace)
    finally:
        os.chdir(previous)


def run_bash(block: Block, run: PageRun) -> None:
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.source],
        cwd=run.folder,
        env=page_environment(run.folder),
        capture_output=True,
        text=True,
        timeout=BASH_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{block.name}: exit status {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )


@pytest.mark.slow
@pytest.mark.timeout(BASH_TIMEOUT_S + 60)
@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.name for b in ALL_BLOCKS])
def test_block_runs(block, page_runs, tiny_model_folder, tmp_path_factory, monkeypatch):
    if block.skip_reason is not None:
        assert block.skip_reason, f"{block.name}: a skip marker needs a reason"
        pytest.skip(f"{block.name}: {block.skip_reason}")
    run = page_runs.get(block.page)
    if run is None:
        folder = tmp_path_factory.mktemp(re.sub(r"\W", "_", str(block.page)))
        run = page_runs[block.page] = PageRun(folder, tiny_model_folder)
    if run.failed:
        pytest.fail(f"{block.name} not run: an earlier block of the page failed ({run.failed})")
    for key, value in page_environment(run.folder).items():
        if key != "PATH" and key != "PYTHONPATH":
            monkeypatch.setenv(key, value)
    try:
        (run_python if block.runner == "python" else run_bash)(block, run)
    except BaseException:
        run.failed = block.name
        raise


# --------------------------------------------------------------------------------- what the text mentions exists
TOP_LEVEL = sorted(p.name for p in REPO_ROOT.iterdir() if not p.name.startswith("."))
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
MMGEM_COMMAND = re.compile(r"(?:(?:^|[\s`(|;&])mmgem|-m mmgem\.cli)[ \t]+((?:--debug[ \t]+)?)([a-z][\w-]*)")
# Paths of another project that a page names (transformers' own test files): `<!-- docs-test: external-paths: A B -->`
EXTERNAL_PATHS = re.compile(r"<!--\s*docs-test:\s*external-paths:(?P<paths>.*?)-->")
DOTTED_NAME = re.compile(r"^(modeling_mmgem|mmgem|conversion|benchmarks|experiments)(\.\w+)+$")


def prose_and_code(page: Path) -> tuple[str, list[Block]]:
    text = (REPO_ROOT / page).read_text(encoding="utf-8")
    blocks = parse_blocks(text, page)[0]
    lines = text.splitlines()
    for block in blocks:  # the prose without the blocks
        for k in range(block.line - 1, block.line + block.source.count("\n") + 1):
            if k < len(lines):
                lines[k] = ""
    return "\n".join(lines), blocks


def repo_path_problems(token: str) -> str | None:
    """A token that looks like a path inside the repository (`tests/test_docs.py`, `recipes/x/run.sh::name`) and
    does not exist; None when it exists or is not such a path (a placeholder, a glob, a generated output)."""
    token = token.split("::")[0].split("#")[0].rstrip("/,.:")
    if not token or " " in token or any(c in token for c in "<>{}*?$[]()=\"'") or "..." in token:
        return None
    first = token.split("/")[0]
    if "/" not in token and first not in ("Makefile", "setup.py", "pyproject.toml", "mkdocs.yml", "README.md"):
        return None
    if first not in TOP_LEVEL:
        return None
    return None if (REPO_ROOT / token).exists() else f"`{token}` does not exist in the repository"


def dotted_name_problem(token: str) -> str | None:
    """`mmgem.integrations.lora.apply_lora`: the longest importable module, then attributes."""
    token = token.rstrip("()")
    if not DOTTED_NAME.match(token) or Path(token).suffix in (".py", ".json", ".md", ".txt", ".jsonl", ".ipynb"):
        return None
    parts = token.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return f"`{token}`: {'.'.join(parts[:cut])} has no {attribute!r}"
            obj = getattr(obj, attribute)
        return None
    return f"`{token}` cannot be imported"


def subcommand_problems(text: str) -> list[str]:
    problems = []
    for match in MMGEM_COMMAND.finditer(text):
        name = match.group(2)
        if name.isupper() or name in ("is", "and", "or", "the", "to", "in", "on", "from", "itself", "needs"):
            continue  # `mmgem COMMAND --help`, and prose about the package
        if name not in COMMANDS:
            problems.append(f"`mmgem {name}`: no such subcommand (mmgem.cli.COMMANDS: {', '.join(COMMANDS)})")
    return problems


SHELL_BREAKS = {"|", "||", "&&", ";", "&", ">", "2>", ">>"}


@functools.cache
def known_flags(subcommand: str) -> frozenset[str]:
    return frozenset(flag.replace("_", "-") for flag in command_flags(subcommand)) | {"--help", "--debug"}


def flag_problems(text: str) -> list[str]:
    """`--options` given to `mmgem SUBCOMMAND` / `mmgem-convert` that the subcommand's parser does not have."""
    problems = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        tokens = line.split()
        for i, token in enumerate(tokens):
            if token.strip("`") == "mmgem-convert":
                subcommand, rest = "convert", tokens[i + 1 :]
            elif token.strip("`") in ("mmgem", "mmgem.cli") and i + 1 < len(tokens):
                rest = tokens[i + 1 :]
                while rest and rest[0] == "--debug":
                    rest = rest[1:]
                if not rest or rest[0].strip("`") not in COMMANDS:
                    continue
                subcommand, rest = rest[0].strip("`"), rest[1:]
            else:
                continue
            for word in rest:
                if word.startswith("#") or word in SHELL_BREAKS:
                    break
                flag = word.strip("`'\"(),").split("=")[0]
                if flag.startswith("--") and flag.replace("_", "-") not in known_flags(subcommand):
                    problems.append(f"`{flag}` is not an option of `mmgem {subcommand}`")
    return problems


def mention_problems(page: Path) -> list[str]:
    prose, blocks = prose_and_code(page)
    external = tuple(p.rstrip("/") for m in EXTERNAL_PATHS.finditer(prose) for p in m.group("paths").split())
    problems = []
    for token in INLINE_CODE.findall(prose):
        path_problem = None if external and token.rstrip("/").startswith(external) else repo_path_problems(token)
        for problem in (path_problem, dotted_name_problem(token)):
            if problem:
                problems.append(problem)
        if token.startswith(("mmgem ", "mmgem-convert ")):
            problems += subcommand_problems(token) + flag_problems(token)
    for block in blocks:
        if block.language in ("bash", "sh", "shell", "text", "console"):
            found = subcommand_problems(block.source) + flag_problems(block.source)
            problems += [f"{problem} (block at line {block.line})" for problem in found]
    for target in LINK.findall(prose):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = ((REPO_ROOT / page).parent / target.split("#")[0]).resolve()
        if not path.exists():
            problems.append(f"link ({target}) goes nowhere")
    return problems


@pytest.mark.parametrize("page", [str(p) for p in doc_pages()])
def test_mentioned_paths_names_and_subcommands_exist(page):
    problems = mention_problems(Path(page))
    assert not problems, f"{page}:\n" + "\n".join(sorted(set(problems)))


def test_the_declared_commands_run_this_checkout(tmp_path):
    scripts = console_scripts(tmp_path)
    assert {p.name for p in scripts.iterdir()} >= {"mmgem", "mmgem-convert"}
    result = subprocess.run(
        [str(scripts / "mmgem"), "--help"], capture_output=True, text=True, env=page_environment(tmp_path), timeout=120
    )
    assert result.returncode == 0 and "commands:" in result.stdout, result.stderr


def test_the_mention_checks_catch_what_they_should():
    assert repo_path_problems("tests/no_such_test.py") is not None
    assert repo_path_problems("tests/test_docs.py::test_page_markup") is None
    assert repo_path_problems("demo-output/model") is None  # not a repository path: an output
    assert repo_path_problems("benchmarks/results/<size>/") is None  # a placeholder
    assert dotted_name_problem("mmgem.cli.COMMANDS") is None
    assert dotted_name_problem("mmgem.cli.NO_SUCH_NAME") is not None
    assert dotted_name_problem("mmgem.no_such_module") is not None
    assert dotted_name_problem("modeling_mmgem.py") is None  # a file name
    assert subcommand_problems("run `mmgem train --help`") == []
    assert subcommand_problems("mmgem trian --data x")
    assert subcommand_problems("python -m mmgem.cli bogus")
    assert flag_problems("mmgem train --model m --max_steps 2 --per-device-train-batch-size 4  # --anything") == []
    assert flag_problems("mmgem train --model m \\\n  --no-such-flag 1") == [
        "`--no-such-flag` is not an option of `mmgem train`"
    ]
    assert flag_problems("mmgem-convert --from-checkpoint a --output-dir b --bogus") != []
    assert flag_problems("torchrun -m mmgem.cli train --bogus && mmgem search --index i") != []
