"""The layers of docs/architecture.md hold: modeling packages <- pnet <- pnet_eval <- experiments (an arrow: "is
imported by"), and no module imports itself back through others. Read from the source (every import statement,
also those inside functions), so the test needs no optional package installed."""

import ast
import importlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"modeling_pnet_llama": "modeling_pnet_llama", "modeling_parameternet": "modeling_parameternet",
                "pnet": "pnet", "pnet_eval": "eval", "experiments": "experiments"}
LAYER = {"modeling_pnet_llama": 0, "modeling_parameternet": 0, "pnet": 1, "pnet_eval": 2, "experiments": 3}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports (``from a import b``: a.b when that is a module, else a)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_graph_sees_the_known_imports():
    graph = import_graph()
    assert "pnet.training" in graph["pnet.pretrain"] and "pnet.config" in graph["pnet.training"]
    assert {"pnet.pretrain", "pnet.finetune", "pnet_eval.zero_shot"} <= graph["experiments.table7"]
    assert len(graph) > 30


def test_no_module_imports_a_higher_layer():
    upward = {(name, target) for name, targets in import_graph().items() for target in targets
              if LAYER[target.split(".")[0]] > LAYER[name.split(".")[0]]}
    assert upward == set()


def test_no_import_circles():
    graph = import_graph()
    cycles = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for target in sorted(graph[node]):
            if target in on_path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                on_path.add(target)
                visit(target, path + [target], on_path, done)
                on_path.discard(target)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start}, done)
    # A package's __init__ importing its own modules is the package's public surface, not a circle.
    cycles = [c for c in cycles if not any(m == c[0].split(".")[0] for m in c)]
    assert cycles == []


@pytest.mark.parametrize("entry", ["pnet.counting:main", "pnet_eval.upcycle_command:main", "pnet_eval.zero_shot:main",
                                   "pnet_eval.report:main", "pnet_eval.model_card:main", "pnet.pretrain:main",
                                   "pnet.vision_train:main", "pnet.finetune:main", "experiments.table7:main",
                                   "experiments.low_flops_trap:main"])
def test_help_starts_with_words(entry, capsys):
    """Every command line's ``--help`` describes the command in plain words (no markup before them)."""
    module, function = entry.split(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(["--help"])
    assert exit_info.value.code == 0
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description[:1].isalpha(), description
