"""`fedsim compare`: the spec expands into cells, bad specs fail up front, a grid runs end to end,
a rerun recomputes nothing, an interrupted cell continues, and a failing cell fails alone."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import fedsim
from fedsim.cli import cli
from fedsim.compare.row import COLUMNS, best_attack
from fedsim.compare.spec import build_grid, check_cells, merge_overrides, read_spec_file
from fedsim.errors import UserInputError
from tests.test_compare_report import browse, chromium, coloured_pixels, parsed

# A FedSGD federation (batch 1, one step) so layer-wise inversion applies and every image column
# has a value; 2 clients, 2 rounds, 1 audited client per round: as short as an audited run gets.
FAST_RUN = {
    "rounds": 2, "clients": 2, "batch-size": 1, "max-local-steps": 1, "momentum": 0.0,
    "fraction-evaluate": 0.0, "audit-clients": 1, "audit-attacks": "layerwise",
}  # fmt: skip


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
    root = Path(__file__).resolve().parent.parent / "benchmarks"
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
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS, ids=[m[:40] for _, m in BAD_SPECS])
def test_bad_specs_fail_up_front_with_one_line(spec: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserInputError) as caught:
        fedsim.compare(spec, out=tmp_path / "out", report=False)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()  # nothing written, no cell ran


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
    from fedsim.compare.spec import DEFENCES

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


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _mtimes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_a_2x2_grid_runs_end_to_end_and_a_rerun_recomputes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    spec = {
        "models": ["mlp", "cnn6"],
        "defences": ["none", {"name": "clip", "clipping-norm": 1.0}],
        "run": FAST_RUN,
    }
    frame = fedsim.compare(spec, out=out, jobs=2, cpus_per_cell=1)  # with the HTML report
    rows = _read(out / "compare.csv")
    assert list(rows[0]) == list(COLUMNS)
    expected = [
        "mlp__digits__none__s0",
        "mlp__digits__clip-C1__s0",
        "cnn6__digits__none__s0",
        "cnn6__digits__clip-C1__s0",
    ]
    assert [r["cell"] for r in rows] == expected and list(frame["cell"]) == expected
    applies = ("accuracy", "model_metrics", "layerwise_score", "e2e_deficit", "psnr_ceiling", "best_attack",
               "best_psnr", "best_ssim", "linear_regions", "wall_s")  # fmt: skip
    for row in rows:
        assert row["status"] == "ok" and row["error"] == "", row
        assert all(row[k] not in ("", "nan") for k in applies), row
        assert row["epsilon"] == row["token_recall"] == row["rouge1"] == ""  # no DP, images
        assert 0 <= float(row["accuracy"]) <= 1 and "loss" in json.loads(row["model_metrics"])
        assert row["best_attack"] == "layerwise" and float(row["best_psnr"]) > 30  # FedSGD, batch 1
        assert (out / row["run_dir"] / "checkpoints" / "round-0002.safetensors").is_file()
    assert [r["defence"] for r in rows] == ["none", "clip(C=1)"] * 2
    _assert_renders_in_chromium(out / "report.html", expected, tmp_path / "browser")

    before, csv_before = _mtimes(out / "runs"), (out / "compare.csv").read_text()
    again = fedsim.compare(spec, out=out, jobs=2, cpus_per_cell=1, report=False)
    assert again.attrs["ran"] == [] and again.attrs["skipped"] == expected
    assert _mtimes(out / "runs") == before  # no federation, no security report rewrote anything
    assert (out / "compare.csv").read_text() == csv_before

    # An interruption in cnn6 + clip's last round: its row never written, its round-2 checkpoint
    # missing. The rerun continues that cell from round 1 and leaves the other three alone.
    cut = out / "runs" / expected[3]
    (cut / "checkpoints" / "round-0002.safetensors").unlink()
    (cut / "compare-cell.json").unlink()
    with open(out / "compare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows[:3])
    round_one = (cut / "checkpoints" / "round-0001.safetensors").stat().st_mtime_ns
    others = {k: v for k, v in before.items() if not k.startswith(expected[3])}
    resumed = fedsim.compare(spec, out=out, jobs=2, cpus_per_cell=1, report=False)
    assert resumed.attrs["ran"] == [expected[3]] and resumed.attrs["skipped"] == expected[:3]
    assert {k: v for k, v in _mtimes(out / "runs").items() if not k.startswith(expected[3])} == others
    assert (cut / "checkpoints" / "round-0001.safetensors").stat().st_mtime_ns == round_one  # continued
    final = _read(out / "compare.csv")
    assert [r["cell"] for r in final] == expected and final[3]["status"] == "ok"
    assert final[3]["best_psnr"] == rows[3]["best_psnr"]  # the same federation, deterministically


def _assert_renders_in_chromium(page: Path, cells: list[str], scratch: Path) -> None:
    """The grid's own report, alone in a folder, rendered by headless Chromium: the DOM holds the
    tables, every cell and the embedded figures, and the screenshot shows the decoded figures."""
    binary = chromium()
    scratch.mkdir()
    alone = scratch / "report.html"
    shutil.copy(page, alone)  # it must need nothing beside it
    dom = browse(binary, alone, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    links = parsed(dom.stdout)
    assert links.tags.count("table") >= 1 and len(links.images) >= 4  # the cell table; 4 figures + grids
    assert all(src.startswith("data:image/png;base64,") for src in links.images)
    assert all(cell in dom.stdout for cell in cells) and "Summary" in dom.stdout
    shots = {}
    for name, page_text in (
        ("figures", alone.read_text(encoding="utf-8")),
        ("broken", alone.read_text(encoding="utf-8").replace("data:image/png;base64,", "data:,")),
    ):
        (scratch / f"{name}.html").write_text(page_text, encoding="utf-8")
        shots[name] = scratch / f"{name}.png"
        size = "--window-size=1300,5000"
        done = browse(binary, scratch / f"{name}.html", f"--screenshot={shots[name]}", size)
        assert done.returncode == 0 and shots[name].is_file(), done.stderr[-2000:]
    # the page's own style is grey: its coloured pixels are the decoded figures (measured 1,336
    # against 192 with the images broken)
    assert coloured_pixels(shots["figures"]) > 4 * max(coloured_pixels(shots["broken"]), 100)


@pytest.mark.slow
def test_a_failing_cell_is_recorded_and_the_others_complete(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    spec = {
        "models": [{"name": "mlp", "label": "mlp-diverges", "learning-rate": 1e30}, "mlp"],
        "run": {**FAST_RUN, "rounds": 1},
    }
    flags = ["--out", str(out), "--jobs", "2", "--cpus-per-cell", "1", "--no-report", "--rounds", "1"]
    result = CliRunner().invoke(cli, ["compare", *flags, *_spec_file(tmp_path, spec)])
    assert result.exit_code == 1, result.output
    rows = _read(out / "compare.csv")
    assert [(r["cell"], r["status"]) for r in rows] == [
        ("mlp-diverges__digits__none__s0", "failed"), ("mlp__digits__none__s0", "ok"),
    ]  # fmt: skip
    assert "learning rate" in rows[0]["error"] and "\n" not in rows[0]["error"]
    assert rows[0]["accuracy"] == "" and rows[1]["accuracy"] != ""
    assert "mlp-diverges__digits__none__s0: failed: " in result.output


def _spec_file(tmp_path: Path, spec: dict[str, Any]) -> list[str]:
    """The spec as a TOML file argument (inline tables, as a user would write it)."""
    path = tmp_path / "grid.toml"
    lines = [f"models = [{', '.join(_toml(m) for m in spec['models'])}]", "[run]"]
    lines += [f"{k} = {_toml(v)}" for k, v in spec["run"].items()]
    path.write_text("\n".join(lines) + "\n")
    return [str(path)]


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)
