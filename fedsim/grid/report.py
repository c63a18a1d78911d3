"""`write_report`: the compare grid's figures and its one-file HTML report.

compare.csv is validated before anything is written; the figures go to <compare_dir>/figures/
and the page is written to a temporary name and renamed, so a failure never leaves a half page.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pandas as pd

from fedsim.errors import UserInputError
from fedsim.grid import plots
from fedsim.grid.analysis import MODALITIES, TEXT, choose, extremes, groups, prediction_error
from fedsim.grid.html import Figure, Recon, page
from fedsim.grid.table import read_compare

REPORT = "report.html"
FIGURES = "figures"


def write_report(compare_dir: Path, target_accuracy: float | None = None) -> Path:
    """Write <compare_dir>/report.html (and its PNGs under figures/) from compare.csv and the
    cells' run directories; return the page's path. `target_accuracy` (0..1) is the accuracy the
    summary's chosen setting must reach; None: each modality's best accuracy minus 5 points."""
    compare_dir = Path(compare_dir)
    if target_accuracy is not None and not (0.0 <= target_accuracy <= 1.0 and math.isfinite(target_accuracy)):
        raise UserInputError(f"target accuracy {target_accuracy} is outside 0..1; pass e.g. 0.8 for 80 %")
    cells = read_compare(compare_dir)
    figures_dir = compare_dir / FIGURES
    grouped = groups(cells)
    present = [m for m in MODALITIES if (grouped["modality"] == m).any()]
    choices = [choose(grouped, modality, target_accuracy) for modality in present]
    error = prediction_error(cells)
    figures = [
        Figure(plots.pareto(cells, figures_dir), "Accuracy against measured leakage per architecture × "
               "defence (mean over seeds); the line joins the Pareto front: no other setting has both "
               "more accuracy and less leakage."),
        Figure(plots.leakage_vs_epsilon(cells, figures_dir), "Measured leakage against the DP budget ε; "
               f"cells without DP are on the right, in the broken-axis panel '{plots.NO_DP}'."),
        Figure(plots.accuracy_vs_epsilon(cells, figures_dir), "Final server accuracy against ε; cells "
               "without DP on the right."),
        Figure(plots.ceiling_vs_measured(cells, figures_dir, error), "The metric's predicted PSNR "
               "ceiling against the best attack's measured PSNR, one point per ok image cell; above "
               "the dashed line the attack beat the prediction."),
    ]  # fmt: skip
    recons = _recons(compare_dir, cells, figures_dir)
    title = f"fedsim compare report: {compare_dir.resolve().name}"
    html = page(title, choices, error, figures, recons, cells)
    target = compare_dir / REPORT
    handle, temporary = tempfile.mkstemp(dir=compare_dir, prefix=".report-", suffix=".html")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(html)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _recons(compare_dir: Path, cells: pd.DataFrame, figures_dir: Path) -> list[Recon]:
    """Per modality, the most and the least leaky cell with their grid or text table (one entry
    when they are the same cell)."""
    recons = []
    for modality in MODALITIES:
        most, least = extremes(cells, modality)
        if most is None or least is None:
            continue
        pairs = [("most leaky", most)] + ([("least leaky", least)] if least["cell"] != most["cell"] else [])
        for role, cell in pairs:
            recons.append(_recon(compare_dir, cell, role, modality, figures_dir))
    return recons


def _recon(compare_dir: Path, cell: pd.Series, role: str, modality: str, figures_dir: Path) -> Recon:
    if modality == TEXT:
        source = plots.audit_file(compare_dir, cell, ".md")
        text = source.read_text(encoding="utf-8", errors="replace") if source is not None else ""
        note = "" if text.strip() else "its run directory has no audit/round-NNNN.md text table"
        return Recon(role, modality, cell, text_table=text, note=note)
    name = f"recon-{role.split()[0]}-{modality}"
    image = plots.reconstruction(compare_dir, cell, name, figures_dir)
    note = "" if image is not None else "its run directory has no audit/round-NNNN.png grid"
    return Recon(role, modality, cell, image=image, note=note)
