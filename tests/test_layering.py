"""Imports flow models -> attacks -> audits -> fedsim, never backwards; only fedsim talks to Flower."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("models", "attacks", "audits", "fedsim")
# Packages a layer must not import although they are not ours: Flower belongs to the federation.
FOREIGN = {"models": {"flwr"}, "attacks": {"flwr"}, "audits": {"flwr"}, "fedsim": set()}


def imported_packages(path: Path) -> set[str]:
    """Top-level package names a module imports (relative imports resolve to its own package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(path.relative_to(ROOT).parts[0] if node.level else (node.module or "").split(".")[0])
    return found


def violations() -> list[str]:
    problems = []
    for rank, layer in enumerate(LAYERS):
        forbidden = set(LAYERS[rank + 1 :]) | FOREIGN[layer]
        for path in sorted((ROOT / layer).rglob("*.py")):
            for package in sorted(imported_packages(path) & forbidden):
                problems.append(f"{path.relative_to(ROOT)} imports {package}")
    return problems


def test_imports_follow_the_data_path() -> None:
    assert violations() == []


def test_the_check_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backwards import planted in a copy of the tree is reported."""
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "models" / "bad.py").write_text("from audits.engine import UpdateAuditor\nimport flwr\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert violations() == ["models/bad.py imports audits", "models/bad.py imports flwr"]
