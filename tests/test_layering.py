"""Imports flow one way: between packages (models -> attacks -> audits -> fedsim), between the
parts of a package (its folders and top-level modules, in the order `PARTS` declares), and inside
each part (no module imports one that imports it back). Only fedsim talks to Flower. Tests import
only `tests.support`; benchmarks never import tests and never patch `sys.path`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("models", "attacks", "audits", "fedsim")
# Packages a layer must not import although they are not ours: Flower belongs to the federation.
FOREIGN = {"models": {"flwr"}, "attacks": {"flwr"}, "audits": {"flwr"}, "fedsim": set()}
# Each package's parts from the bottom up; a part imports itself and the tiers below it only.
# A package not listed here (models: one module per family) is only checked for cycles.
PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "attacks": (
        ("base",),
        ("analytic", "disclosure", "layerwise", "replay", "text"),
        ("optimisation",),
        ("auto",),
        ("registry",),
        ("__init__",),
    ),
    "audits": (("similarity",), ("security",), ("scoring",), ("architecture",), ("__init__",)),
    "fedsim": (
        ("errors", "progress"),
        ("config",),
        ("data",),
        ("training",),
        ("wire",),
        ("store",),
        ("strategy",),
        ("plan",),
        ("federation",),
        ("_worker", "run_regions"),
        ("launch",),
        ("grid",),
        ("api",),
        ("cli",),
        ("__main__", "__init__"),
    ),
}


def module_name(path: Path) -> str:
    """`fedsim/plan/resume.py` -> `fedsim.plan.resume`; a package's `__init__.py` -> its name."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> Iterator[str]:
    """Dotted names a module imports; `from a.b import c` yields `a.b.c` when that is a module of
    ours (a file or a folder), else `a.b`. Relative imports resolve against the module's package."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                yield candidate if _is_ours(candidate) else module


def _is_ours(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _own_module(dotted: str) -> str:
    """The longest prefix of `dotted` that is a module of ours (an attribute import names its module)."""
    parts = dotted.split(".")
    while len(parts) > 1 and not _is_ours(".".join(parts)):
        parts.pop()
    return ".".join(parts)


def _part(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _tier(package: str, part: str) -> int | None:
    for rank, tier in enumerate(PARTS[package]):
        if part in tier:
            return rank
    return None


def graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (in the four packages)."""
    edges: dict[str, set[str]] = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            mine = module_name(path)
            edges[mine] = {
                _own_module(name)
                for name in imported_modules(path)
                if name.split(".")[0] in LAYERS and _own_module(name) != mine
            }
            edges[mine] |= {f"<{name.split('.')[0]}>" for name in imported_modules(path)} - {
                f"<{layer}>" for layer in LAYERS
            }
    return edges


def violations() -> list[str]:
    problems = []
    edges = graph()
    for module, targets in sorted(edges.items()):
        package = module.split(".")[0]
        rank = LAYERS.index(package)
        for target in sorted(targets):
            if target.startswith("<"):
                if target.strip("<>") in FOREIGN[package]:
                    problems.append(f"{module} imports {target.strip('<>')}")
                continue
            other = target.split(".")[0]
            if LAYERS.index(other) > rank:
                problems.append(f"{module} imports {target} (package {other} is above {package})")
            elif other == package and package in PARTS:
                mine, theirs = _part(module), _part(target)
                rank_mine, rank_theirs = _tier(package, mine), _tier(package, theirs)
                if rank_mine is None or rank_theirs is None:
                    problems.append(f"{module} or {target}: a part of {package} missing from PARTS")
                elif mine != theirs and rank_theirs >= rank_mine:
                    problems.append(f"{module} imports {target} ({theirs} is not below {mine})")
    return problems + cycles(edges)


def cycles(edges: dict[str, set[str]]) -> list[str]:
    """Each import cycle among our modules, once, as `a -> b -> a`."""
    found: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt in edges and nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return [f"import cycle: {cycle}" for cycle in found]


def helper_imports(folder: str) -> list[str]:
    """Imports of test modules (tests.test_* or conftest) and any `sys.path` patching in `folder`."""
    problems = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        for name in imported_modules(path):
            top = name.split(".")
            if top[0] == "tests" and (folder == "benchmarks" or len(top) == 1 or top[1] != "support"):
                problems.append(f"{path.relative_to(ROOT)} imports {name}")
        if "sys.path" in text and path.name != "test_layering.py":
            problems.append(f"{path.relative_to(ROOT)} patches sys.path")
    return problems


def test_imports_follow_the_data_path() -> None:
    assert violations() == []


def test_tests_import_only_the_support_package_and_benchmarks_import_no_tests() -> None:
    assert helper_imports("tests") + helper_imports("benchmarks") == []


def _plant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> list[str]:
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
        (tmp_path / layer / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    return violations()


def test_the_check_fails_on_an_import_between_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = _plant(tmp_path, monkeypatch, {"models/bad.py": "from audits import scoring\nimport flwr\n"})
    assert found == ["models.bad imports flwr", "models.bad imports audits (package audits is above models)"]


def test_the_check_fails_on_an_import_back_up_inside_fedsim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        "fedsim/strategy/__init__.py": "",
        "fedsim/strategy/chain.py": "from fedsim.plan.resume import open_for_resume\n",
        "fedsim/plan/__init__.py": "",
        "fedsim/plan/resume.py": "OPEN = 1\n",
    }
    found = _plant(tmp_path, monkeypatch, files)
    assert found == ["fedsim.strategy.chain imports fedsim.plan.resume (plan is not below strategy)"]


def test_the_check_fails_on_a_cycle_inside_a_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {
        "fedsim/store/__init__.py": "",
        "fedsim/store/files.py": "from fedsim.store import csv_log\n",
        "fedsim/store/csv_log.py": "from fedsim.store.files import atomic_write\n",
    }
    found = _plant(tmp_path, monkeypatch, files)
    assert found == ["import cycle: fedsim.store.csv_log -> fedsim.store.files -> fedsim.store.csv_log"]


def test_the_helper_check_fails_on_a_test_importing_a_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tests" / "support").mkdir(parents=True)
    for name in ("tests/__init__.py", "tests/support/__init__.py", "tests/test_a.py"):
        (tmp_path / name).write_text("X = 1\n")
    (tmp_path / "tests" / "test_b.py").write_text("from tests.test_a import X\nfrom tests.support import Y\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "run.py").write_text("import sys\nsys.path.insert(0, '.')\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert helper_imports("tests") + helper_imports("benchmarks") == [
        "tests/test_b.py imports tests.test_a",
        "benchmarks/run.py patches sys.path",
    ]
