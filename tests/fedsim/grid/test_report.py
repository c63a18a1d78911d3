"""The compare report: figures, the one-file HTML page and its summary, from a compare.csv.

These tests read a HAND-WRITTEN compare.csv (TEST DATA, numbers chosen so the expected Pareto
front, chosen setting and Spearman ρ can be worked out by hand below); the browser test renders
the page in Chromium. The report of a real grid is rendered in tests/fedsim/grid/test_compare.py.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

from fedsim.cli import cli
from fedsim.errors import UserInputError
from fedsim.grid.analysis import choose, groups, pareto_front, prediction_error
from fedsim.grid.report import write_report
from fedsim.grid.table import COLUMNS, read_compare
from tests.support.chromium import browse, chromium, coloured_pixels, parsed

INJECTION = "<script>alert(1)</script>"
# TEST DATA, not measurements: (cell fields) -> compare.csv rows. Images on digits, text on fortunes.
HAND_WRITTEN = [
    # model, dataset, defence, seed, status, accuracy, epsilon, psnr_ceiling, best_psnr, token_recall
    ("mlp", "digits", "none", 0, "ok", 0.90, None, 35.0, 30.0, None),
    ("mlp", "digits", "none", 1, "ok", 0.92, None, 36.0, 32.0, None),
    ("mlp", "digits", "dp-sgd(ε=8)", 0, "ok", 0.86, 8.0, 18.0, 15.0, None),
    ("mlp", "digits", "dp-sgd(ε=1)", 0, "ok", 0.60, 1.0, 10.0, 9.0, None),
    ("cnn6", "digits", "none", 0, "ok", 0.88, None, 42.0, 40.0, None),
    ("cnn6", "digits", "top-k(0.1)", 0, "ok", 0.87, None, 37.0, 20.0, None),
    ("cnn6", "digits", "clip(C=1)", 0, "failed", None, None, None, None, None),
    ("cloze", "fortunes", "none", 0, "ok", 0.14, None, None, None, 1.0),
    ("cloze", "fortunes", "dp-sgd(ε=8)", 0, "ok", 0.10, 8.0, None, None, 0.4),
    ("ltw", "fortunes", "none", 0, "ok", 0.12, None, None, None, None),  # attack declined: no leakage
]


def cell_id(model: str, dataset: str, defence: str, seed: int) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in defence)
    return f"{model}__{dataset}__{slug}__s{seed}"


def write_compare_csv(folder: Path, rows: list[dict[str, object]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "compare.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in COLUMNS})
    return path


def hand_written_rows() -> list[dict[str, object]]:
    rows = []
    for model, dataset, defence, seed, status, acc, eps, ceiling, psnr, recall in HAND_WRITTEN:
        cell = cell_id(model, dataset, defence, seed)
        rows.append({
            "cell": cell, "model": model, "dataset": dataset, "defence": defence,
            "defence_params": json.dumps({"epsilon": eps} if eps else {}), "seed": seed,
            "status": status, "error": f"diverged {INJECTION}" if status == "failed" else "",
            "accuracy": acc, "model_metrics": json.dumps({"macro_f1": acc} if acc else {}),
            "epsilon": eps, "layerwise_score": 0 if dataset == "digits" else None,
            "psnr_ceiling": ceiling, "best_attack": "layerwise" if psnr else ("token-set" if recall else ""),
            "best_psnr": psnr, "best_ssim": None if psnr is None else psnr / 50, "token_recall": recall,
            "rouge1": recall, "wall_s": 1.5, "run_dir": f"runs/{cell}",
        })  # fmt: skip
    return rows


def png(path: Path, colour: str) -> bytes:
    fig = Figure(figsize=(1, 1), dpi=20)
    fig.patch.set_facecolor(colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path.read_bytes()


def hand_written_dir(folder: Path) -> Path:
    """The hand-written compare directory, with a fake run directory for the most leaky image cell
    (two round grids; audit.csv says round 2 scored best) and a text table for the most leaky
    text cell."""
    write_compare_csv(folder, hand_written_rows())
    run = folder / "runs" / cell_id("cnn6", "digits", "none", 0)
    png(run / "audit" / "round-0001.png", "red")
    png(run / "audit" / "round-0002.png", "blue")
    (run / "audit.csv").write_text("round,partition_id,attack,psnr\n1,0,layerwise,12.0\n2,0,layerwise,40.0\n")
    text_run = folder / "runs" / cell_id("cloze", "fortunes", "none", 0)
    (text_run / "audit").mkdir(parents=True)
    (text_run / "audit" / "round-0001.md").write_text(
        "| sample | attack | sequence | true | recovered |\n|---|---|---|---|---|\n"
        "| 3 | token-set | set | ~~cat~~ dog | dog **<b>bold</b>** |\n"
    )
    return folder


@pytest.fixture(scope="module")
def report_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="compare-report-"))
    hand_written_dir(folder)
    write_report(folder)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def page_html(report_dir: Path) -> str:
    return (report_dir / "report.html").read_text(encoding="utf-8")


# ---- analysis on the hand-written data ---------------------------------------------------------


def test_pareto_front_has_the_non_dominated_settings() -> None:
    grouped = groups(read_compare_rows(hand_written_rows()))
    images = grouped[grouped["modality"] == "images"]
    front = pareto_front(images)
    # (leakage, accuracy): mlp/none (31, .91), mlp/dp8 (15, .86), mlp/dp1 (9, .60), cnn6/none (40, .88),
    # cnn6/top-k (20, .87): only cnn6/none is beaten (by mlp/none: more accuracy, less leakage).
    assert front["label"].tolist() == [
        "mlp / dp-sgd(ε=1)",
        "mlp / dp-sgd(ε=8)",
        "cnn6 / top-k(0.1)",
        "mlp / none",
    ]
    assert front["leakage"].tolist() == [9.0, 15.0, 20.0, 31.0]


def test_pareto_front_ties_and_missing_values() -> None:
    points = pd.DataFrame({"accuracy": [0.8, 0.8, 0.9, math.nan], "leakage": [10.0, 10.0, 12.0, 1.0]})
    assert pareto_front(points).index.tolist() == [0, 1, 2]  # equal points do not beat each other
    points.loc[1, "leakage"] = 11.0
    assert pareto_front(points).index.tolist() == [0, 2]


def test_summary_chooses_the_least_leaky_setting_at_the_target() -> None:
    grouped = groups(read_compare_rows(hand_written_rows()))
    # images: best 0.91 (mlp/none, 2 seeds) -> target 0.86; mlp/dp8 reaches it with 15 dB
    choice = choose(grouped, "images")
    assert choice.target_accuracy == pytest.approx(0.86) and choice.target_default
    assert choice.chosen["label"] == "mlp / dp-sgd(ε=8)" and choice.reaching == 4
    # a stricter target leaves mlp/none, cnn6/none, cnn6/top-k: top-k leaks least (20 dB)
    assert choose(grouped, "images", 0.87).chosen["label"] == "cnn6 / top-k(0.1)"
    assert choose(grouped, "images", 0.95).chosen is None
    # text: best 0.14 -> 0.09; ltw reaches it without a measured leakage and is not chosen
    text = choose(grouped, "text")
    assert text.chosen["label"] == "cloze / dp-sgd(ε=8)"
    assert (text.reaching, text.reaching_measured) == (3, 2)


def test_language_models_without_accuracy_get_no_choice() -> None:
    rows = [r | {"accuracy": None, "model_metrics": '{"perplexity": 83.9}'} for r in hand_written_rows()]
    grouped = groups(read_compare_rows([r for r in rows if r["dataset"] == "fortunes"]))
    choice = choose(grouped, "text")
    assert choice.target_accuracy is None and choice.chosen is None
    assert choose(grouped, "text", 0.1).reaching == 0


def test_spearman_and_median_gap_by_hand() -> None:
    error = prediction_error(read_compare_rows(hand_written_rows()))
    # ceiling ranks 3 4 2 1 6 5, measured ranks 4 5 2 1 6 3 (rows in HAND_WRITTEN order): d² = 1+1+4
    assert error.pairs == 6
    assert error.spearman == pytest.approx(1 - 6 * 6 / (6 * (36 - 1)))
    assert error.median_abs_db == pytest.approx(3.5)  # gaps 5 4 3 1 2 17
    two = read_compare_rows(hand_written_rows()[:2])
    assert prediction_error(two).spearman is None  # two points always rank ±1: not reported


def read_compare_rows(rows: list[dict[str, object]]) -> pd.DataFrame:
    folder = Path(tempfile.mkdtemp(prefix="compare-rows-"))
    try:
        write_compare_csv(folder, rows)
        return read_compare(folder)
    finally:
        shutil.rmtree(folder)


# ---- the page ------------------------------------------------------------------------------------


def test_page_states_the_choice_and_the_prediction_error(page_html: str) -> None:
    summary = page_html[page_html.index('<div class="summary">') : page_html.index("<h2>Figures")]
    assert "mlp / dp-sgd(ε=8)</strong>" in summary and "target accuracy 0.860" in summary
    assert "best accuracy (0.910) minus 5 points" in summary
    assert "cloze / dp-sgd(ε=8)</strong>" in summary
    assert "median 3.5 dB" in summary and f"{1 - 36 / 210:.2f}" in summary
    assert "10 cells, 9 ran, 1 failed" in summary


def test_failed_cells_are_flagged_and_their_errors_escaped(page_html: str) -> None:
    failed = cell_id("cnn6", "digits", "clip(C=1)", 0)
    row = page_html[page_html.index('<tr class="failed">') :].split("</tr>")[0]
    assert failed in row and "FAILED" in row
    assert "diverged &lt;script&gt;alert(1)&lt;/script&gt;" in row
    assert INJECTION not in page_html and "<b>bold</b>" not in page_html
    assert page_html.count('<tr class="failed">') == 1


def test_missing_values_are_shown_as_missing(page_html: str) -> None:
    ltw = page_html[page_html.index(cell_id("ltw", "fortunes", "none", 0)) :].split("</tr>")[0]
    assert "<td>ok</td>" in ltw and ltw.count("–") >= 5  # no ε, no PSNR, no recall...
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page_html)
    assert not re.search(r"\b(nan|inf)\b", text, flags=re.IGNORECASE)


def test_no_external_references(page_html: str) -> None:
    links = parsed(page_html)
    assert links.refs, "the page has no src/href at all: the check below would be vacuous"
    for ref in links.refs:
        assert not ref.startswith(("http://", "https://", "//")), ref
        assert ref.startswith("data:") or ref.startswith("#"), ref
    for tag in ("script", "link", "iframe", "object", "embed"):
        assert tag not in links.tags
    assert "url(" not in page_html and "@import" not in page_html


def test_all_images_embedded(report_dir: Path, page_html: str) -> None:
    images = parsed(page_html).images
    figures = sorted(p.name for p in (report_dir / "figures").glob("*.png"))
    # the least leaky image cell has no run directory, so one reconstruction grid only
    assert figures == [
        "accuracy_vs_epsilon.png", "ceiling_vs_measured.png", "leakage_vs_epsilon.png", "pareto.png",
        "recon-most-images.png",
    ]  # fmt: skip
    assert len(images) == len(figures)
    embedded = {base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in images}
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert embedded == {(report_dir / "figures" / name).read_bytes() for name in figures}


def test_recon_grid_is_the_best_round_and_text_table_rendered(report_dir: Path, page_html: str) -> None:
    run = report_dir / "runs" / cell_id("cnn6", "digits", "none", 0) / "audit"
    assert (report_dir / "figures" / "recon-most-images.png").read_bytes() == (
        run / "round-0002.png"
    ).read_bytes()
    assert "<td><del>cat</del> dog</td>" in page_html
    assert "<td>dog <strong>&lt;b&gt;bold&lt;/b&gt;</strong></td>" in page_html
    # the least leaky image cell (mlp/dp-sgd(ε=1), 9 dB) has no run directory: said, not hidden
    least = page_html[page_html.index("Least leaky (images)") :]
    assert "has no audit/round-NNNN.png grid" in least.split("<h3>")[0]


def test_figures_are_pngs_with_content(report_dir: Path) -> None:
    from matplotlib.image import imread

    for name in ("pareto", "leakage_vs_epsilon", "accuracy_vs_epsilon", "ceiling_vs_measured"):
        pixels = imread(report_dir / "figures" / f"{name}.png")[..., :3]
        coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.25
        assert coloured.sum() > 50, f"{name} has no coloured marks"


def test_rewriting_is_deterministic(report_dir: Path, page_html: str, tmp_path: Path) -> None:
    copy = tmp_path / report_dir.name  # the title names the folder
    shutil.copytree(report_dir, copy)
    write_report(copy)
    again = (copy / "report.html").read_text(encoding="utf-8")
    assert again == page_html


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "compare.csv not found; run `fedsim compare` first"),
        ("", "is not a readable CSV"),
        ("cell,model\nx,mlp\n", "lacks the column(s) dataset, defence"),
        (",".join(COLUMNS) + "\n", "has no cells"),
        ('\x00\xff garbage "unterminated\n', "lacks the column(s)"),
    ],
)
def test_bad_compare_csv_is_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "compare.csv").write_text(content, encoding="utf-8")
    with pytest.raises(UserInputError) as raised:
        write_report(tmp_path)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "figures").exists()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("accuracy", "high", "row 2: accuracy 'high' is not a number"),
        ("status", "done", "row 2: status 'done' is not one of ok, failed"),
        ("model_metrics", "[1, 2]", "row 2: model_metrics is not a JSON object"),
        ("cell", "", "row 2: empty cell id"),
    ],
)
def test_garbled_values_are_named(tmp_path: Path, column: str, value: str, message: str) -> None:
    rows = hand_written_rows()
    rows[0][column] = value
    write_compare_csv(tmp_path, rows)
    with pytest.raises(UserInputError) as raised:
        write_report(tmp_path)
    assert message in str(raised.value)
    assert not (tmp_path / "report.html").exists()


def test_target_accuracy_outside_0_1_is_refused(tmp_path: Path) -> None:
    write_compare_csv(tmp_path, hand_written_rows())
    with pytest.raises(UserInputError, match=r"outside 0\.\.1"):
        write_report(tmp_path, target_accuracy=85)


def test_all_cells_failed_still_reports(tmp_path: Path) -> None:
    rows = [r | {"status": "failed", "error": "boom", "accuracy": None} for r in hand_written_rows()]
    write_compare_csv(tmp_path, rows)
    html = write_report(tmp_path).read_text(encoding="utf-8")
    assert "10 cells, 0 ran, 10 failed" in html and html.count('<tr class="failed">') == 10
    assert "could not be checked" in html


def test_cli_report_writes_the_page_and_refuses_a_missing_csv(tmp_path: Path) -> None:
    hand_written_dir(tmp_path / "grid")
    done = CliRunner().invoke(cli, ["report", str(tmp_path / "grid"), "--target-accuracy", "0.87"])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == f"wrote {tmp_path / 'grid' / 'report.html'}"
    assert "cnn6 / top-k(0.1)</strong>" in (tmp_path / "grid" / "report.html").read_text(encoding="utf-8")
    missing = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert missing.exit_code == 2
    assert missing.output.startswith("error: ") and len(missing.output.strip().splitlines()) == 1
    assert "compare.csv not found" in missing.output


# ---- in a real browser ---------------------------------------------------------------------------


def test_page_renders_in_chromium(report_dir: Path, tmp_path: Path) -> None:
    binary = chromium()
    page = tmp_path / "report.html"
    shutil.copy(report_dir / "report.html", page)  # alone: it must need nothing beside it
    dom = browse(binary, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    links = parsed(dom.stdout)
    assert links.tags.count("table") >= 2 and len(links.images) == 5
    assert "Summary" in dom.stdout and cell_id("cnn6", "digits", "clip(C=1)", 0) in dom.stdout
    shot = tmp_path / "shot.png"
    done = browse(binary, page, f"--screenshot={shot}", "--window-size=1300,5000")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    # the page's own style is grey; saturated pixels come only from the decoded figures
    with_figures = coloured_pixels(shot)
    bare = tmp_path / "bare.html"
    bare.write_text(
        page.read_text(encoding="utf-8").replace("data:image/png;base64,", "data:,"), encoding="utf-8"
    )
    done = browse(binary, bare, f"--screenshot={tmp_path / 'bare.png'}", "--window-size=1300,5000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert with_figures > 2_000 and with_figures > 5 * coloured_pixels(tmp_path / "bare.png")  # 6,406 vs 396
    grey = imread_grey(shot)
    assert (grey < 0.5).mean() > 0.01  # text and table rules drawn, not a blank page


def imread_grey(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)[..., :3].mean(axis=2)
