"""The mkdocs-gen-files script: writes the reference and benchmark pages from the code's own
declarations at build time, and brings the notebooks and the benchmark figures into the site
without a second copy in the repository (they are read from `notebooks/` and
`benchmarks/results/` when the site is built).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the `mkdocs` script does not run from the repository
    sys.path.insert(0, str(ROOT))

from docs.gen import benchmarks, reference, schemas  # noqa: E402
from docs.gen.corpus import bad_input_rows  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
RESULTS = ROOT / "benchmarks" / "results"
COMPARE_GRIDS = ("compare_default", "compare_text")
API = (
    "fedsim.api.run",
    "fedsim.api.audit",
    "fedsim.api.compare",
    "fedsim.api.RunResult",
    "fedsim.api.AuditResult",
    "fedsim.config.run_config.RunConfig",
    "fedsim.errors",
)


def write(name: str, text: str, source: str | None = None) -> None:
    with mkdocs_gen_files.open(name, "w") as handle:
        handle.write(text)
    mkdocs_gen_files.set_edit_path(name, source)


def copy(name: str, path: Path) -> None:
    with mkdocs_gen_files.open(name, "wb") as handle:
        handle.write(path.read_bytes())


def reference_pages() -> None:
    import typer

    import fedsim.training.defences  # noqa: F401 - registers the built-in defences
    from attacks.registry import ATTACKS
    from fedsim.cli import SERVER_DEFENCES, cli
    from fedsim.config.run_config import RunConfig
    from fedsim.data.registry import DATASETS
    from fedsim.training.transforms import TRANSFORMATIONS
    from models import MODELS
    from models.options import builder_options

    write("reference/config.md", reference.render_knobs(RunConfig))
    write("reference/cli.md", reference.render_commands(typer.main.get_command(cli), RunConfig))
    write("reference/csv.md", reference.render_csv_schemas(schemas.csv_schemas()))
    write("reference/models.md", reference.render_models(MODELS, builder_options))
    write("reference/attacks.md", reference.render_attacks(ATTACKS))
    write("reference/defences.md", reference.render_defences(TRANSFORMATIONS, SERVER_DEFENCES, RunConfig))
    write("reference/datasets.md", reference.render_datasets(DATASETS, MODELS))
    write("reference/api.md", reference.render_api(API))
    write("reference/bad-input.md", reference.render_bad_input(bad_input_rows()))


def fill(name: str, tables: dict[str, str]) -> None:
    """Rewrite the hand-written page `name` with each marker line `<!-- generated: KEY -->` replaced
    by its table (a missing marker stops the build: the page and this script disagree)."""
    text = (ROOT / "docs" / name).read_text()
    for key, body in tables.items():
        marker = f"<!-- generated: {key} -->"
        if marker not in text:
            raise SystemExit(f"docs/{name} lacks the line {marker}")
        text = text.replace(marker, body)
    write(name, text, name)


def benchmark_pages() -> None:
    write("benchmarks/results.md", benchmarks.render_results(benchmarks.load_results(RESULTS)))
    fill(
        "benchmarks/compare-grids.md",
        {
            f"{grid}/compare.csv": benchmarks.render_compare_csv(RESULTS / grid / "compare.csv")
            for grid in COMPARE_GRIDS
        },
    )
    for grid in COMPARE_GRIDS:
        for figure in sorted((RESULTS / grid).glob("*.png")):
            copy(f"benchmarks/figures/{grid}/{figure.name}", figure)
    for figure in sorted(RESULTS.glob("*.png")):
        copy(f"benchmarks/figures/{figure.name}", figure)


def tutorials() -> None:
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        copy(f"tutorials/{notebook.name}", notebook)
        mkdocs_gen_files.set_edit_path(f"tutorials/{notebook.name}", f"../notebooks/{notebook.name}")


reference_pages()
benchmark_pages()
tutorials()
