"""The reference and benchmark pages are rendered from the declarations they document: change a
declaration (a knob, a column, a registry entry, a results file) and the rendered page changes.
Each renderer takes its declaration as an argument, so these tests hand it one of their own."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer

from attacks.registry import ATTACKS, AttackEntry
from docs.gen import benchmarks, reference, schemas
from docs.gen.offline import remote_assets
from fedsim.cli import SERVER_DEFENCES, cli
from fedsim.config.run_config import RunConfig, knob
from fedsim.data.registry import DATASETS, DatasetEntry
from fedsim.training.defences import TripleUntouched
from fedsim.training.transforms import TRANSFORMATIONS, TransformationEntry
from models import MODELS, ModelEntry
from models.classifiers import mlp
from models.options import builder_options


@dataclass(frozen=True)
class ExtendedConfig(RunConfig):
    """RunConfig with one more knob, as a developer would add it."""

    rehearsal_rounds: int = knob(
        4, "Rounds each client rehearses before the federation.", "training", at_least=1
    )
    guard_mode: str = knob("strict", "How the guard reacts.", "guard", choices=("strict", "lax"))


def test_a_knob_added_to_the_config_class_appears_in_the_config_page() -> None:
    page = reference.render_knobs(ExtendedConfig)
    row = next(line for line in page.splitlines() if line.startswith("| `rehearsal-rounds`"))
    assert "(also `rehearsal_rounds`)" in row
    assert "`--rehearsal-rounds`" in row and "`int`" in row and "`4`" in row and "≥ 1" in row
    assert "Rounds each client rehearses before the federation." in row
    assert "## guard" in page and "`strict`, `lax`" in page
    assert f"{len(RunConfig.knobs()) + 2} knobs" in page
    plain = reference.render_knobs(RunConfig)
    assert "rehearsal-rounds" not in plain and "## guard" not in plain
    for spec in RunConfig.knobs():  # every real knob, with its flag
        assert f"`--{spec.key}`" in plain


def test_the_command_page_shows_each_commands_own_options_and_not_the_knob_flags() -> None:
    page = reference.render_commands(typer.main.get_command(cli), RunConfig)
    run = page[page.index("## `fedsim run`") : page.index("## `fedsim audit`")]
    assert "`--resume`" in run and "`--stop-after`" in run
    assert "`--learning-rate`" not in run and f"every one of the {len(RunConfig.knobs())}" in run
    audit = page[page.index("## `fedsim audit`") : page.index("## `fedsim compare`")]
    assert "`--model`" in audit and "`--gradient-noise`" in audit  # its own, though knobs share names
    group = click.Group("fedsim", commands=[click.Command("probe", help="Probe things.", params=[
        click.Option(["--depth"], default=3, help="How deep to probe.")])])  # fmt: skip
    probe = reference.render_commands(group, RunConfig)
    assert "## `fedsim probe`" in probe and "| `--depth` | `3` | How deep to probe. |" in probe


def test_a_column_added_to_a_csv_appears_in_its_schema() -> None:
    audit = next(s for s in schemas.csv_schemas() if s.file == "audit.csv")
    extended = reference.CsvSchema(
        audit.file, audit.source, audit.summary, (*audit.columns, "gradient_norm"), audit.descriptions
    )
    page = reference.render_csv_schema(extended)
    assert f"| {len(extended.columns)} | `gradient_norm` | *(not described yet)* |" in page
    assert reference.undescribed(extended) == ["gradient_norm"]
    assert "`gradient_norm`" not in reference.render_csv_schema(audit)


def test_every_declared_csv_column_is_described_and_no_description_is_stale() -> None:
    found = schemas.csv_schemas()
    assert [s.file for s in found] == ["metrics.csv", "audit.csv", "privacy.csv", "faults.csv", "compare.csv"]
    for schema in found:
        assert reference.undescribed(schema) == [], f"{schema.file}: describe these in docs/gen/schemas.py"
        assert reference.stale(schema) == [], f"{schema.file}: these columns are gone from {schema.source}"


def test_a_registered_attack_appears_in_the_attack_page() -> None:
    entry = AttackEntry(
        ATTACKS["idlg"].build, "Telepathy: reads the client's mind.", "any client that thinks"
    )
    page = reference.render_attacks({**ATTACKS, "telepathy": entry})
    assert "| `telepathy` | Telepathy: reads the client's mind. | any client that thinks |" in page
    assert "telepathy" not in reference.render_attacks(ATTACKS)
    assert all(f"| `{name}` |" in reference.render_attacks(ATTACKS) for name in ATTACKS)


def wide_mlp(spec, *, width: int = 512, gated: bool = False):  # type: ignore[no-untyped-def]
    """A wide MLP registered by this test only."""
    return mlp(spec, hidden=width)


def test_a_registered_model_appears_with_its_options_in_the_model_page() -> None:
    page = reference.render_models(
        {**MODELS, "wide-mlp": ModelEntry(wide_mlp, ("image",), "digits")}, builder_options
    )
    row = next(line for line in page.splitlines() if line.startswith("| `wide-mlp`"))
    assert "`width=512`, `gated=False`" in row and "A wide MLP registered by this test only." in row
    assert "| image | `digits` |" in row
    assert "wide-mlp" not in reference.render_models(MODELS, builder_options)


def test_a_registered_defence_and_dataset_appear_in_their_pages() -> None:
    entry = TransformationEntry(lambda config: TripleUntouched(), "Shuffle the update's signs.", ("keep",))
    page = reference.render_defences({**TRANSFORMATIONS, "signflip": entry}, SERVER_DEFENCES, RunConfig)
    assert "| `signflip` | Shuffle the update's signs. | `keep` (`0.1`) |" in page
    assert "`--secagg`" in page and "signflip" not in reference.render_defences(
        TRANSFORMATIONS, SERVER_DEFENCES, RunConfig
    )

    def tiny_images():  # type: ignore[no-untyped-def]
        """Four 2×2 images drawn by this test."""

    datasets = reference.render_datasets({**DATASETS, "tiny": DatasetEntry(tiny_images, "image")}, MODELS)
    assert "| `tiny` | image | – | mlp, " in datasets and "Four 2×2 images drawn by this test." in datasets


def test_the_api_page_is_one_mkdocstrings_block_per_object() -> None:
    page = reference.render_api(
        ["fedsim.api.run", "fedsim.api.RunResult"], {"fedsim.api.RunResult": {"members": "[load]"}}
    )
    assert (
        "::: fedsim.api.run\n" in page
        and "::: fedsim.api.RunResult\n    options:\n      members: [load]\n" in page
    )


def test_the_bad_input_page_lists_every_case_and_escapes_control_characters() -> None:
    rows = [
        ("name-nul", "run --name a\x00b", "contains the control character"),
        ("pipe", "run --x a|b", "a | b"),
    ]
    page = reference.render_bad_input(rows)
    assert "2 cases" in page
    assert "| 1 | `name-nul` | `run --name a\\x00b` |" in page and "a \\| b" in page


def test_a_results_file_added_to_the_folder_appears_in_the_results_page(tmp_path: Path) -> None:
    (tmp_path / "warp_speed.json").write_text(json.dumps({
        "goal": "faster than light", "goal_met": False, "seconds": 12.3456,
        "runs": [{"engine": "ion", "speed": {"mean": 0.5, "max": 0.75}},
                 {"engine": "warp", "speed": {"mean": 2}}],
        "by_ship": {"a": {"crew": 3}, "b": {"crew": 4}},
    }))  # fmt: skip
    page = benchmarks.render_results(benchmarks.load_results(tmp_path))
    assert "## `warp_speed.json`" in page
    assert (
        "| `goal` | faster than light |" in page
        and "| `goal_met` | no |" in page
        and "| `seconds` | 12.35 |" in page
    )
    assert "| `engine` | `speed.mean` | `speed.max` |" in page and "| warp | 2 | – |" in page
    assert "| a | 3 |" in page


def test_the_compare_table_is_read_from_compare_csv(tmp_path: Path) -> None:
    from fedsim.grid.row import COLUMNS

    rows = [
        {"cell": "mlp__digits__none__s0", "model": "mlp", "dataset": "digits", "defence": "none",
         "seed": "0", "status": "ok", "accuracy": "0.9333333", "best_attack": "idlg", "best_psnr": "7.2",
         "wall_s": "125.0"},
        {"cell": "dam__digits__dp__s0", "model": "dam-mlp", "dataset": "digits", "defence": "dp-sgd(ε=8)",
         "seed": "0", "status": "failed", "error": "Opacus refuses the model", "wall_s": "109.0"},
    ]  # fmt: skip
    path = tmp_path / "compare.csv"
    path.write_text(
        ",".join(COLUMNS) + "\n" + "".join(",".join(r.get(c, "") for c in COLUMNS) + "\n" for r in rows)
    )
    page = benchmarks.render_compare_csv(path)
    assert "| model | dataset | defence | seed | accuracy | best attack | PSNR (dB) | wall (s) |" in page
    assert "| mlp | digits | none | 0 | 0.9333 | idlg | 7.2 | 125 |" in page
    assert "| dam-mlp | digits | dp-sgd(ε=8) | 0 | **failed**: Opacus refuses the model |  |  | 109 |" in page


@pytest.mark.parametrize(
    ("html", "found"),
    [
        ('<script src="https://cdn.example/x.js"></script>', True),
        ('<link rel="stylesheet" href="//fonts.example/f.css">', True),
        ("<script>import('https://cdn.example/m.mjs')</script>", True),
        ('<script src="data:text/javascript,"> </script>', False),
        ('<script src="../assets/bundle.js"></script><a href="https://flower.ai">Flower</a>', False),
        ('<link rel="canonical" href="https://example.org/page/">', False),
    ],
)
def test_the_offline_check_finds_remote_assets_only(html: str, found: bool) -> None:
    assert bool(remote_assets(html)) is found
