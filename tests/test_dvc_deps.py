"""dvc.yaml's code deps are exactly what each stage imports; the package has no import cycle.

A stage whose deps miss a module it imports is not rerun when that module changes (a stale
model DVC calls up to date); a dep it does not import reruns it for nothing. A package the
stage runs whole is listed as its folder (``src/convpipe/training``); the other modules one by
one. The import closure is read from the source (every ``import`` of a ``convpipe`` module,
function-level ones included, and the packages each one runs), so the test needs no dvc.yaml
annotations.
"""

from __future__ import annotations

import ast
from pathlib import Path

from ruamel.yaml import YAML

from tests.helpers.project import ROOT

SRC = ROOT / "src"
PACKAGE = "convpipe"


def _module_file(name: str) -> Path | None:
    """The file of module ``name`` (``convpipe.data.prepare``), or None if it is no module."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path) -> set[str]:
    """The ``convpipe`` modules ``path`` imports, wherever in the file the import is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from convpipe.data import sources` imports the module convpipe.data.sources
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = set()
    for name in found:
        if name.split(".")[0] == PACKAGE and _module_file(name) is not None:
            parts = name.split(".")
            modules |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # packages run
    return modules


def _collapsed(files: set[Path], folder: Path) -> set[Path]:
    """``files`` under ``folder``, a whole package folder standing for all of its modules."""
    modules = set(folder.rglob("*.py"))
    if folder != SRC / PACKAGE and modules and modules <= files:
        return {folder}
    out = {f for f in files if f.parent == folder}
    for sub in sorted(p for p in folder.iterdir() if (p / "__init__.py").is_file()):
        out |= _collapsed(files, sub)
    return out


def import_closure(script: Path) -> set[str]:
    """The deps ``script`` needs: itself and every convpipe file it runs.

    Paths relative to the project root. A package the stage runs whole is one folder
    (``src/convpipe/training``); of the others, the modules it runs (``src/convpipe/io.py``,
    ``src/convpipe/data/manifest.py``).
    """
    seen: set[str] = set()
    todo = sorted(_imported(script))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        file = _module_file(name)
        assert file is not None
        todo += sorted(_imported(file) - seen)
    files = {_module_file(name) for name in seen}
    deps = _collapsed({f for f in files if f is not None}, SRC / PACKAGE)
    return {str(script.relative_to(ROOT))} | {str(d.relative_to(ROOT)) for d in deps}


def drift(stages: dict) -> dict[str, tuple[list[str], list[str]]]:
    """Per ``python pipelines/...`` stage: (imported but not a dep, a dep but not imported)."""
    out = {}
    for name, stage in stages.items():
        cmd = stage["cmd"].split()
        if cmd[:1] != ["python"]:
            continue
        want = import_closure(ROOT / cmd[1])
        deps = {str(d) for d in stage.get("deps", []) if str(d).startswith(("src/", "pipelines/"))}
        missing, extra = sorted(want - deps), sorted(deps - want)
        if missing or extra:
            out[name] = (missing, extra)
    return out


def _stages() -> dict:
    return YAML(typ="safe").load(ROOT / "dvc.yaml")["stages"]


def test_each_stage_depends_on_exactly_the_modules_it_imports() -> None:
    problems = drift(_stages())
    report = "; ".join(
        f"{stage}: add {missing or 'nothing'}, remove {extra or 'nothing'}"
        for stage, (missing, extra) in problems.items()
    )
    assert not problems, f"dvc.yaml deps drifted from the imports: {report}"


def test_a_drifted_dvc_yaml_is_caught() -> None:
    stages = _stages()
    deps = stages["train"]["deps"]
    dropped = next(d for d in deps if str(d).startswith("src/convpipe/training"))
    deps.remove(dropped)
    deps.append("src/convpipe/cli.py")  # the train stage never imports the CLI
    assert drift(stages) == {"train": ([dropped], ["src/convpipe/cli.py"])}


def test_the_runtime_section_is_no_stage_param() -> None:
    """How a training runs never reruns it: no stage lists ``runtime`` (or a key of it)."""
    for name, stage in _stages().items():
        listed = [str(p) for p in stage.get("params", []) if isinstance(p, str)]
        assert not [p for p in listed if p.split(".")[0] == "runtime"], name


def _graph() -> dict[str, set[str]]:
    """Every convpipe module and the convpipe modules it imports (packages excluded)."""
    graph = {}
    for file in (SRC / PACKAGE).rglob("*.py"):
        parts = file.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {m for m in _imported(file) if _module_file(m).name != "__init__.py"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``, each as the modules around it."""
    found: list[list[str]] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(_graph()) == []


def test_a_cycle_is_caught() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


#: The code map of docs/architecture.md, "may import": each package's convpipe dependencies
#: besides the shared top-level modules (:data:`SHARED`) and itself.
MAY_IMPORT = {
    "config": set(),
    "data": {"config"},
    "models": {"config"},
    "inference": {"config", "data", "models"},
    "tools": {"config", "data", "models", "inference"},
    "tracking": {"config", "data", "models", "inference"},
    "evaluation": {"config", "data", "models", "inference", "tracking"},
    "training": {"config", "data", "models", "tracking"},
    "tuning": {"config", "inference", "models", "training", "tracking"},
}


#: The top-level modules every package may use.
SHARED = {"errors", "io", "redact", "hardware"}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else parts[-1]  # convpipe.errors -> "errors"


def test_dependencies_point_the_way_the_code_map_says() -> None:
    wrong = []
    for module, imports in sorted(_graph().items()):
        allowed = MAY_IMPORT.get(_package(module))
        if allowed is None:  # the CLI, the stage runner and the shared helpers
            continue
        for target in sorted(imports):
            package = _package(target)
            if package not in allowed | SHARED | {_package(module)}:
                wrong.append(f"{module} -> {target}")
    assert wrong == []
