"""`fedsim compare` end to end: a 2 x 2 grid, its report in Chromium, a rerun, a resumed and a
failing cell."""

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
from fedsim.grid.row import COLUMNS
from tests.support.chromium import browse, chromium, coloured_pixels, parsed

# A FedSGD federation (batch 1, one step) so layer-wise inversion applies and every image column
# has a value; 2 clients, 2 rounds, 1 audited client per round: as short as an audited run gets.
FAST_RUN = {
    "rounds": 2, "clients": 2, "batch-size": 1, "max-local-steps": 1, "momentum": 0.0,
    "fraction-evaluate": 0.0, "audit-clients": 1, "audit-attacks": "layerwise",
}  # fmt: skip


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
