"""`fedsim compare`: the spec expands into cells, bad specs fail up front, a grid runs end to end,
a rerun recomputes nothing, an interrupted cell continues, and a failing cell fails alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import fedsim
from fedsim.cli import cli
from fedsim.errors import UserInputError
from fedsim.grid.row import best_attack
from fedsim.grid.spec import MAX_CELLS, build_grid, check_cells, merge_overrides, read_spec_file
from tests.support.runs import ROOT


def test_a_spec_expands_into_cells_in_grid_order() -> None:
    grid = build_grid(
        {
            "name": "demo",
            "models": ["mlp", {"name": "cnn6", "image-size": 16}],
            "defences": [
                "none",
                {"name": "clip", "clipping-norm": 2},
                {"name": "dp-sgd", "target-epsilon": 8},
            ],
            "seeds": [0, 3],
            "run": {"rounds": 5},
        }
    )
    assert grid.name == "demo"
    assert [c.id for c in grid.cells[:4]] == [
        "mlp__digits__none__s0",
        "mlp__digits__none__s3",
        "mlp__digits__clip-C2__s0",
        "mlp__digits__clip-C2__s3",
    ]
    assert len(grid.cells) == 2 * 3 * 2
    dp = next(c for c in grid.cells if c.id == "cnn6__digits__dp-sgd-eps8__s3")
    assert dp.defence.label == "dp-sgd(ε=8)"
    assert json.loads(dp.defence.params_json) == {"defence": "dp-sgd", "target-epsilon": 8.0}
    config = dp.config
    assert (config.model, config.image_size, config.seed, config.rounds) == ("cnn6", 16, 3, 5)
    assert (config.defence, config.target_epsilon, config.audit, config.name) == ("dp-sgd", 8.0, True, dp.id)
    clip = grid.cells[2]
    assert (clip.defence.label, clip.config.clipping_norm, clip.config.defence) == ("clip(C=2)", 2.0, "clip")
    assert json.loads(grid.cells[0].defence.params_json) == {}


def test_the_benchmark_grids_parse_and_a_model_may_pin_its_dataset() -> None:
    root = ROOT / "benchmarks" / "leakage"
    default = build_grid(read_spec_file(root / "compare_default.toml"))
    assert len(default.cells) == 5 * 5
    assert {c.defence.label for c in default.cells} == {
        "none", "clip(C=1)", "top-k(0.1)", "dp-sgd(ε=8)", "dp-sgd(ε=1)",
    }  # fmt: skip
    text = build_grid(read_spec_file(root / "compare_text.toml"))
    pairs = [("text-dnn", "fortunes-lsa")] * 2 + [("cloze", "fortunes")] * 2
    assert [(c.model, c.dataset) for c in text.cells] == pairs
    assert text.cells[2].config.audit_attacks == "token-set,dager"


def test_cli_lists_replace_the_spec_lists_and_run_keys_override_its_run_table() -> None:
    spec = {"models": ["mlp", "cnn6"], "defences": ["clip"], "run": {"rounds": 4, "clients": 3}}
    merged = merge_overrides(spec, {"models": ["cnn6-d"], "rounds": 2, "clients": None, "seeds": None})
    assert merged == {"models": ["cnn6-d"], "defences": ["clip"], "run": {"rounds": 2, "clients": 3}}


def test_a_knob_spelled_differently_in_the_spec_and_the_defaults_or_the_cli_is_one_setting() -> None:
    """`[run] audit_clients` overrides the grid's default `audit-clients`; `--clients` overrides
    the spec's `num-clients`: spellings merge by knob, the later source winning, never refused."""
    spec = {"run": {"audit_clients": 2, "num-clients": 3}}
    (cell,) = build_grid(merge_overrides(spec, {"clients": 5})).cells
    assert cell.config.audit_clients == 2 and cell.config.num_clients == 5
    (cell,) = build_grid(spec).cells
    assert cell.config.num_clients == 3


BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"models": ["resnet"]}, "unknown model 'resnet'; choose one of"),
    ({"datasets": ["cifar10"]}, "unknown dataset 'cifar10'; choose one of"),
    ({"defences": ["dp-sgdd"]}, "unknown defence 'dp-sgdd' in compare spec; choose from: none, clip, topk"),
    ({"defences": [{"name": "clip", "keep": 0.1}]}, "defence 'clip' in compare spec takes no key 'keep'"),
    ({"defences": [{"name": "topk", "keep": 2.0}]}, "keep must be in (0, 1]"),
    ({"models": []}, "models in compare spec must be a non-empty list"),
    ({"seeds": ["zero"]}, "seeds in compare spec must be integers"),
    ({"run": {"rounds": "2"}}, "rounds in compare spec (cell mlp__digits__none__s0) must be int"),
    (
        {"run": {"rouns": 2}},
        "unknown key 'rouns' in compare spec (cell mlp__digits__none__s0); did you mean 'rounds'?",
    ),
    ({"run": {"defence": "clip"}}, "key 'defence' is not allowed in [run] of compare spec"),
    (
        {"model": ["mlp"]},
        "unknown key 'model' in compare spec; use name, models, datasets, defences, seeds, run",
    ),
    ({"models": [{"name": "mlp", "learning-rate": "fast"}]}, "learning-rate in model 'mlp' of compare spec"),
    ({"models": [{"label": "x"}]}, "each entry of models in compare spec must be a model name or a table"),
    ({"models": ["mlp", "mlp"]}, "two cells of compare spec share the id 'mlp__digits__none__s0'"),
    ({"run": {"audit-attacks": "dlgg"}}, "unknown attack(s) dlgg"),
    ({"run": {"clients": 5000}}, "no cell can run; cell mlp__digits__none__s0: 5000 clients but only"),
    ({"seeds": [-1]}, "seed must be in [0, 4294967295] (got -1); pass --seeds in that range"),
    ({"run": {"clients": 2, "num_clients": 3}}, "[run] of compare spec sets clients 2 times"),
    (
        {"seeds": list(range(10**6))},
        "compare spec has 1,000,000 cells (1 models × 1 datasets × 1 defences × 1000000 seeds), "
        f"over the limit of {MAX_CELLS:,}",
    ),
    (
        {
            "models": ["mlp", {"name": "cloze", "dataset": "fortunes"}],
            "datasets": ["digits"] * 10,
            "defences": ["none"] * 10,
            "seeds": list(range(10)),
        },
        "compare spec has 1,100 cells (2 models × 10 datasets × 10 defences × 10 seeds)",
    ),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS, ids=[m[:40] for _, m in BAD_SPECS])
def test_bad_specs_fail_up_front_with_one_line(spec: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserInputError) as caught:
        fedsim.compare(spec, out=tmp_path / "out", report=False)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()  # nothing written, no cell ran


def test_a_grid_at_the_cell_limit_expands_and_ids_stay_unique() -> None:
    grid = build_grid({"seeds": list(range(MAX_CELLS))})
    assert len(grid.cells) == MAX_CELLS == len({cell.id for cell in grid.cells})


def test_a_combination_that_cannot_run_is_a_failed_cell_not_a_bad_spec() -> None:
    grid = build_grid({"models": ["mlp", "convnet-bn"], "defences": ["none", "dp-sgd"]})
    refused = check_cells(grid)
    assert list(refused) == ["convnet-bn__digits__dp-sgd-z1__s0"]
    assert "BatchNorm" in refused["convnet-bn__digits__dp-sgd-z1__s0"]


def test_cli_bad_spec_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    spec = tmp_path / "grid.toml"
    spec.write_text('models = ["mlp"]\ndefences = ["none", "clipp"]\n')
    result = CliRunner().invoke(cli, ["compare", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: unknown defence 'clipp' in compare spec; choose from: {', '.join(_defence_names())}"
    ]
    assert not (tmp_path / "out").exists()
    lists = CliRunner().invoke(cli, ["compare", "--models", "mlp,,cnn6", "--out", str(tmp_path / "out")])
    assert lists.exit_code == 2 and "empty entry in the list 'mlp,,cnn6'" in lists.output


def _defence_names() -> list[str]:
    from fedsim.grid.spec import DEFENCES

    return list(DEFENCES)


def test_the_best_attack_is_the_best_mean_over_reconstructed_rows() -> None:
    rows = [
        {"attack": "idlg", "status": "reconstructed", "psnr": "20", "ssim": "0.5"},
        {"attack": "idlg", "status": "reconstructed", "psnr": "10", "ssim": "0.3"},
        {"attack": "layerwise", "status": "reconstructed", "psnr": "14", "ssim": "0.9"},
        {"attack": "layerwise", "status": "declined", "psnr": "", "ssim": ""},
        {"attack": "dlg", "status": "failed", "psnr": "99", "ssim": "1"},
    ]
    assert best_attack(rows) == {
        "best_attack": "idlg", "best_psnr": 15.0, "best_ssim": 0.4, "token_recall": None, "rouge1": None,
    }  # fmt: skip
    text = [
        {"attack": "token-set", "status": "reconstructed", "token_recall": "1.0", "rouge1": ""},
        {"attack": "dager", "status": "reconstructed", "token_recall": "0.5", "rouge1": "0.4"},
    ]
    assert best_attack(text)["best_attack"] == "token-set" and best_attack(text)["best_psnr"] is None
    assert best_attack([])["best_attack"] is None
