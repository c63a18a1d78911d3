"""The documentation site builds with `mkdocs build --strict` (no broken link or anchor, no page
missing from the navigation, no warning, nothing loaded from the network), with its reference
pages generated from the code, the notebooks rendered from notebooks/ unexecuted, and the
benchmark figures brought in from benchmarks/results/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs.gen.offline import remote_assets
from fedsim.config.run_config import RunConfig
from tests.support.docs import DOCS, build_site
from tests.support.runs import ROOT

# Imports fedsim, the bad-input corpus and the zoo, renders three notebooks: about 25 s idle.
pytestmark = pytest.mark.slow

GENERATED = (
    "reference/cli", "reference/config", "reference/csv", "reference/models", "reference/attacks",
    "reference/defences", "reference/datasets", "reference/api", "reference/bad-input", "benchmarks/results",
)  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    result = build_site(folder)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    warnings = [line for line in log.splitlines() if re.match(r"(WARNING|ERROR)\b", line)]
    assert warnings == [], warnings
    return folder


def text_of(page: Path) -> str:
    return re.sub(r"<[^>]+>", " ", page.read_text())


def test_the_site_builds_strictly_with_every_page(site: Path) -> None:
    for name in GENERATED:
        assert (site / name / "index.html").is_file(), name
    for page in DOCS.rglob("*.md"):
        if "gen" in page.relative_to(DOCS).parts:
            continue
        html = page.relative_to(DOCS).with_suffix("")
        html = html.parent if html.name == "index" else html
        assert (site / html / "index.html").is_file(), page


def test_the_reference_pages_come_from_the_code(site: Path) -> None:
    config = (site / "reference" / "config" / "index.html").read_text()
    assert all(f"--{spec.key}" in config for spec in RunConfig.knobs())
    api = text_of(site / "reference" / "api" / "index.html")
    for name in ("fedsim.api.run", "fedsim.api.audit", "fedsim.api.compare", "fedsim.api.RunResult",
                 "fedsim.api.AuditResult", "fedsim.config.run_config.RunConfig"):  # fmt: skip
        assert name in api
    assert "Run a federation and return its results." in api  # run's docstring
    bad_input = text_of(site / "reference" / "bad-input" / "index.html")
    assert "unknown-defence" in bad_input and "cli-errors-config-1" in bad_input


def test_the_notebooks_are_rendered_from_notebooks_without_a_copy(site: Path) -> None:
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 3
    assert not list(DOCS.rglob("*.ipynb")), "notebooks/ holds the one copy of each notebook"
    for notebook in notebooks:
        page = site / "tutorials" / notebook.stem / "index.html"
        assert "fedsim" in text_of(page), notebook.name


def test_the_benchmark_figures_and_tables_are_in_the_site(site: Path) -> None:
    for figure in (ROOT / "benchmarks" / "results" / "compare_default").glob("*.png"):
        assert (site / "benchmarks" / "figures" / "compare_default" / figure.name).is_file()
    grids = text_of(site / "benchmarks" / "compare-grids" / "index.html")
    assert "<!-- generated" not in (site / "benchmarks" / "compare-grids" / "index.html").read_text()
    assert "protopnet" in grids and "token-set" in grids  # a row of each committed compare.csv
    results = text_of(site / "benchmarks" / "results" / "index.html")
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert path.name in results


def test_no_page_loads_anything_from_the_network(site: Path) -> None:
    pages = list(site.rglob("*.html"))
    assert len(pages) > 30
    assert {
        str(p.relative_to(site)): remote_assets(p.read_text()) for p in pages if remote_assets(p.read_text())
    } == {}
    assert not (ROOT / ".cache" / "mkdocs-jupyter").exists()
