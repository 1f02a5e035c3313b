"""The floors hold: every import in the source tree (lazy ones inside functions included) points down.

    utils (0) <- dataset (1) <- ops (2, the kernels) <- evals (3) <- trainer (4), zoo (4) <- scripts, bench, tests

A package imports only itself and packages of a lower floor; library code never imports a script; no
script imports another script; no module imports itself back through a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"utils": 0, "dataset": 1, "ops": 2, "evals": 3, "trainer": 4, "zoo": 4}
SCANNED = (*FLOORS, "bench")


def project_sources(root: Path = ROOT) -> dict[str, str]:
    """Module name -> source, for the packages, bench/ and the top-level scripts."""
    sources = {p.stem: p.read_text(encoding="utf-8") for p in root.glob("*.py")}
    for folder in SCANNED:
        for path in (root / folder).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            sources[name] = path.read_text(encoding="utf-8")
    return sources


def imports_of(source: str, modules: set[str]) -> set[str]:
    """Project modules that ``source`` imports anywhere (``from a import b`` counts as ``a.b`` when that is a
    module, else as ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules or n.split(".")[0] in modules}
    return {n if n in modules else n.split(".")[0] for n in found}


def violations(sources: dict[str, str]) -> list[str]:
    """Every broken floor rule and every import circle among ``sources`` (module name -> source)."""
    modules = set(sources)
    scripts = {m for m in modules if "." not in m and m not in FLOORS and m != "bench"}
    graph = {m: imports_of(src, modules) - {m} for m, src in sources.items()}
    problems = []
    for mod, targets in sorted(graph.items()):
        top = mod.split(".")[0]
        for target in sorted(targets):
            dest = target.split(".")[0]
            if dest in scripts and target in scripts:
                problems.append(f"{mod} imports the script {target}")
            elif top in FLOORS and dest in FLOORS and dest != top and FLOORS[dest] >= FLOORS[top]:
                problems.append(f"{mod} (floor {FLOORS[top]}) imports {target} (floor {FLOORS[dest]})")
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for target in sorted(graph.get(mod, ())):
            if state.get(target) == 1:
                problems.append("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    return problems


def test_the_source_tree_keeps_its_floors():
    sources = project_sources()
    expected = {"utils.files", "dataset.data_module", "ops.head", "evals.atec", "trainer.losses", "forget_me_gd"}
    assert expected <= set(sources)
    assert violations(sources) == []


def test_utils_imports_nothing_of_the_project():
    sources = project_sources()
    modules = set(sources)
    for name, source in sources.items():
        if name.split(".")[0] == "utils":
            assert {m for m in imports_of(source, modules) if not m.startswith("utils")} == set(), name


def test_the_checker_sees_upward_imports_script_imports_and_circles():
    """The rules fire on planted breaks, lazy imports inside functions included."""
    planted = {
        "utils": "", "utils.files": "def f():\n    from dataset.data_module import x\n",
        "dataset": "", "dataset.data_module": "import utils.files\n",
        "evals": "", "evals.atec": "from evals import tofu\n", "evals.tofu": "import evals.atec\n",
        "trainer": "", "trainer.recipe": "from zoo.tiny import build\n", "zoo": "", "zoo.tiny": "",
        "predict_demo": "", "extract_data": "from predict_demo import predict_answers\n",
    }
    found = violations(planted)
    assert "utils.files (floor 0) imports dataset.data_module (floor 1)" in found
    assert "trainer.recipe (floor 4) imports zoo.tiny (floor 4)" in found
    assert "extract_data imports the script predict_demo" in found
    assert any(p.startswith("import circle:") and "evals.atec" in p and "evals.tofu" in p for p in found)
    assert any(p.startswith("import circle:") and "utils.files" in p and "dataset.data_module" in p for p in found)
