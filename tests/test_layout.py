"""The project's layout: what travels to the Hub, which way imports flow, and the weight names checkpoints use.

- `modeling_mmgem/` is the remote code saved next to the weights: it imports only the standard library, torch,
  transformers (and numpy / PIL, which transformers' image processors need) and its own siblings, through
  single-dot relative imports; a saved folder holds exactly its files.
- The project's own modules import each other without a cycle (imports inside functions included), and nothing in
  `modeling_mmgem/` imports the library (`mmgem`, the conversion code `mmgem.conversion` included).
- Imports inside functions are for optional or heavy third-party packages only, never for the standard library.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

from mmgem.build import tiny_mmgem

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
HUB_PACKAGE = REPO / "modeling_mmgem"
PROJECT_PACKAGES = ("modeling_mmgem", "mmgem", "benchmarks", "experiments")
# Third-party packages the remote code may import (numpy and PIL come with transformers' image processing).
HUB_DEPENDENCIES = {"torch", "transformers", "numpy", "PIL"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[ast.stmt, list[str], bool]]:
    """(node, imported module names, inside a function) for every import of `module`, relative ones resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.append((child, [alias.name for alias in child.names], in_function))
            elif isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                prefix = ".".join(base + [child.module] if child.module else base)
                found.append((child, [prefix] + [f"{prefix}.{alias.name}" for alias in child.names], in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _project_module(name: str) -> str | None:
    """The project module `name` is or lies in (`pkg.mod.Class` -> `pkg.mod`), or None for other code."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for _, names, _ in _imports(module, path):
            graph[module] |= {m for m in map(_project_module, names) if m and m != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            connect(node)
    return groups


# ------------------------------------------------------------------------------------------ the Hub code
@pytest.mark.parametrize("path", sorted(HUB_PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_hub_files_import_only_stdlib_torch_transformers_and_siblings(path):
    module = f"modeling_mmgem.{path.stem}" if path.stem != "__init__" else "modeling_mmgem"
    for node, names, _ in _imports(module, path):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1, f"{path.name}:{node.lineno}: only single-dot relative imports travel with the code"
            assert (HUB_PACKAGE / f"{names[0].rpartition('.')[2]}.py").is_file(), f"{path.name}:{node.lineno}"
            continue
        top = names[0].split(".")[0]
        assert top in sys.stdlib_module_names or top in HUB_DEPENDENCIES, (
            f"{path.name}:{node.lineno} imports {names[0]!r}: remote code may use only the standard library, "
            f"{sorted(HUB_DEPENDENCIES)} and its siblings"
        )


def test_a_saved_folder_holds_exactly_the_hub_files(tmp_path):
    model, processor = tiny_mmgem()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = sorted(p.name for p in tmp_path.glob("*.py"))
    assert saved == sorted(p.name for p in HUB_PACKAGE.glob("*.py") if p.name != "__init__.py")


def test_weight_names_are_unchanged():
    """Every published checkpoint loads by these names: renaming a module breaks them all silently (random init).
    (Their order is not part of a checkpoint: safetensors and `from_pretrained` match weights by name.)"""
    model, _ = tiny_mmgem()
    names = [f"{name} {tuple(tensor.shape)}" for name, tensor in model.state_dict().items()]
    committed = (DATA / "tiny_mmgem_state_dict_keys.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(names) == sorted(committed) and len(names) == len(set(names))


# ------------------------------------------------------------------------------------------ import directions
def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_a_cycle_is_found():
    """The check above can fail: a made-up graph with a loop through three modules."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Project modules a function may import where it needs them, and why: an optional extra, or transformers' model
# machinery (~5 s) kept out of the paths that only build a parser (`mmgem evaluate --help`, `mmgem app --help`).
LAZY_PROJECT_MODULES = {
    "modeling_mmgem.pipeline_mmgem": "transformers' pipeline machinery, which loading a model never needs",
    "mmgem.app.space_app": "gradio (extra `app`)",
    "mmgem.integrations.mteb": "mteb (extra `mteb`)",
    "mmgem.plots": "matplotlib, only when the demo draws its figures",
    "mmgem.loading": "model loading, after the arguments are checked",
    "mmgem.data.records": "the image loader of the processor, after the arguments are checked",
    "modeling_mmgem.processing_mmgem": "the processor, after the arguments are checked",
    "mmgem.search": "the search index (FAISS, extra `search`)",
    "mmgem.search.sources": "the search index (FAISS, extra `search`)",
    "mmgem.search.searcher": "the search index (FAISS, extra `search`)",
    "mmgem.search.indexer": "the search index (FAISS, extra `search`)",
    "mmgem.integrations.sentence_transformers": "sentence-transformers, optional for the comparison benchmarks",
}


def test_imports_inside_functions_are_only_for_optional_or_heavy_modules():
    """Everything else of the project is imported at the top, where a reader looks for a module's dependencies."""
    stray = []
    for module, path in MODULES.items():
        for node, names, in_function in _imports(module, path):
            target = _project_module(names[0]) or next(filter(None, map(_project_module, names[1:])), None)
            if in_function and target and target not in LAZY_PROJECT_MODULES:
                stray.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    assert stray == []


def test_imports_flow_one_way():
    graph = _graph()
    for module, targets in graph.items():
        top = module.split(".")[0]
        for target in targets:
            target_top = target.split(".")[0]
            if top == "modeling_mmgem":
                assert target_top == "modeling_mmgem", f"{module} (remote code) imports {target}"
            if target_top in ("benchmarks", "experiments"):
                assert top == target_top, f"{module} imports {target}: nothing in the packages imports them"


def test_imports_inside_functions_are_not_for_the_standard_library():
    """A function-level import delays an optional or heavy package; the standard library goes at the top."""
    misplaced = []
    for module, path in MODULES.items():
        for node, names, in_function in _imports(module, path):
            optional_platform_module = names[0] == "resource"  # Unix only: imported where it is used
            if in_function and not getattr(node, "level", 0) and not optional_platform_module:
                if names[0].split(".")[0] in sys.stdlib_module_names:
                    misplaced.append(f"{module}:{node.lineno} {names[0]}")
    assert misplaced == []


def test_loading_a_model_imports_no_pipeline_machinery_and_a_saved_folder_serves_the_pipelines(tmp_path):
    """The model's remote code keeps transformers' pipelines out of a plain load (a tenth of a second each time);
    the saved folder still declares every pipeline and carries their file, whose classes the model lists."""
    import subprocess

    model, processor = tiny_mmgem()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["custom_pipelines"]) == set(model.pipeline_classes())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mmgem.MMGEMModel"
    assert (tmp_path / "pipeline_mmgem.py").is_file()
    script = (
        "import sys\nfrom transformers import AutoModel\n"
        f"AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "print(sorted(m for m in sys.modules if 'pipeline' in m))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pipeline_mmgem" not in result.stdout and "transformers.pipelines" not in result.stdout, result.stdout
