"""The compare report's figures, one function per figure, each writing a PNG and returning its path.

Missing values are drawn, not dropped silently: failed cells appear in no figure (the page lists
them); cells without DP (ε empty) are drawn in a narrow right-hand panel headed "no DP (ε = ∞)",
a broken x axis beside the log-ε panel, one slot per defence; leakage is a PSNR (dB) for images and
a token recall for text, in separate panels, never on one axis. Points are architecture ×
defence groups (the mean over seeds); colour is the architecture.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedsim.grid.analysis import (
    IMAGES,
    LEAKAGE_LABEL,
    MODALITIES,
    PredictionError,
    groups,
    pareto_front,
    prediction_error,
)

DPI = 100
NO_DP = "no DP (ε = ∞)"


def architecture_colours(models: list[str]) -> dict[str, str]:
    """One stable colour per architecture (sorted names over matplotlib's tab10 cycle)."""
    palette = [f"C{i}" for i in range(10)]
    return {model: palette[i % len(palette)] for i, model in enumerate(sorted(set(models)))}


def leakage_vs_epsilon(frame: pd.DataFrame, out: Path) -> Path:
    """Measured leakage against ε, one row of panels per modality present."""
    grouped = groups(frame)
    present = [m for m in MODALITIES if (grouped["modality"] == m).any()] or [IMAGES]
    fig = Figure(figsize=(9, 3.6 * len(present)), dpi=DPI, layout="constrained")
    panels = fig.subfigures(len(present), 1, squeeze=False)[:, 0]
    colours = architecture_colours(grouped["model"].tolist())
    for panel, modality in zip(panels, present, strict=True):
        rows = grouped[grouped["modality"] == modality]
        _epsilon_panels(panel, rows, "leakage", LEAKAGE_LABEL[modality], f"Leakage vs ε: {modality}", colours)
    return _save(fig, out / "leakage_vs_epsilon.png")


def accuracy_vs_epsilon(frame: pd.DataFrame, out: Path) -> Path:
    """Final server accuracy against ε (one unit, so all modalities share the panel)."""
    grouped = groups(frame)
    fig = Figure(figsize=(9, 3.8), dpi=DPI, layout="constrained")
    colours = architecture_colours(grouped["model"].tolist())
    _epsilon_panels(fig, grouped, "accuracy", "final server accuracy", "Accuracy vs ε", colours)
    return _save(fig, out / "accuracy_vs_epsilon.png")


def _epsilon_panels(
    fig: Figure, rows: pd.DataFrame, column: str, ylabel: str, title: str, colours: dict[str, str]
) -> None:
    """A log-ε panel and, on its right, the broken-axis panel of the cells without DP."""
    rows = rows.dropna(subset=[column])
    dp = rows[rows["epsilon"].notna()]
    no_dp = rows[rows["epsilon"].isna()]
    ax, inf_ax = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [4, 1.3], "wspace": 0.02})
    fig.suptitle(title)
    if rows.empty:
        ax.text(0.5, 0.5, "no ok cell measured this", ha="center", va="center", transform=ax.transAxes)
    for (model, dataset, kind), line in dp.groupby(
        [dp["model"], dp["dataset"], dp["defence"].str.split("(").str[0]], sort=True
    ):
        line = line.sort_values("epsilon")
        label = f"{model} ({kind}, {dataset})"
        ax.plot(line["epsilon"], line[column], "o-", color=colours[model], label=label)
    if not dp.empty:
        ax.set_xscale("log")
    elif not rows.empty:
        ax.text(0.5, 0.5, "no DP cell in this grid", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("ε (log scale)" if not dp.empty else "ε (no DP cell)")
    ax.set_ylabel(ylabel)
    defences = sorted(no_dp["defence"].unique())
    for _, row in no_dp.iterrows():
        ax_x = defences.index(row["defence"])
        inf_ax.plot(ax_x, row[column], "s", color=colours[row["model"]], label=row["model"])
    inf_ax.set_xticks(range(len(defences)), defences, rotation=30, ha="right", fontsize=8)
    inf_ax.set_xlim(-0.6, max(len(defences), 1) - 0.4)
    inf_ax.set_title(NO_DP, fontsize=9)
    ax.spines["right"].set_visible(False)
    inf_ax.spines["left"].set_linestyle((0, (3, 3)))
    inf_ax.tick_params(labelleft=False, left=False)
    _legend(ax, inf_ax)


def _legend(*axes: Axes) -> None:
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        axes[0].legend(handles, labels, fontsize=7, loc="best")


def ceiling_vs_measured(frame: pd.DataFrame, out: Path, error: PredictionError | None = None) -> Path:
    """Predicted PSNR ceiling (x) against the best attack's PSNR (y) per ok image cell, the
    diagonal y = x, and Spearman's ρ and the median gap printed on the figure."""
    error = error or prediction_error(frame)
    cells = frame[frame["status"] == "ok"].dropna(subset=["psnr_ceiling", "best_psnr"])
    fig = Figure(figsize=(6.4, 5.2), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    colours = architecture_colours(frame["model"].tolist())
    for model, rows in cells.groupby("model", sort=True):
        ax.plot(rows["psnr_ceiling"], rows["best_psnr"], "o", color=colours[model], label=model)
    if not cells.empty:
        low = float(min(cells["psnr_ceiling"].min(), cells["best_psnr"].min())) - 2
        high = float(max(cells["psnr_ceiling"].max(), cells["best_psnr"].max())) + 2
        ax.plot([low, high], [low, high], "--", color="0.5", linewidth=1, label="measured = predicted")
        ax.legend(fontsize=8, loc="lower right")
    rho = "n/a" if error.spearman is None else f"{error.spearman:.2f}"
    gap = "n/a" if error.median_abs_db is None else f"{error.median_abs_db:.1f} dB"
    ax.text(
        0.03, 0.97, f"Spearman ρ = {rho} (n = {error.pairs})\nmedian |ceiling − measured| = {gap}",
        transform=ax.transAxes, va="top", fontsize=10, bbox={"facecolor": "white", "edgecolor": "0.7"},
    )  # fmt: skip
    ax.set_xlabel("predicted PSNR ceiling (dB)")
    ax.set_ylabel("measured best-attack PSNR (dB)")
    ax.set_title("Predicted ceiling vs measured attack (image cells)")
    return _save(fig, out / "ceiling_vs_measured.png")


def pareto(frame: pd.DataFrame, out: Path) -> Path:
    """Accuracy against leakage per architecture × defence, each point labelled, the Pareto
    front (more accuracy, less leakage) joined by a line; one panel per modality present."""
    grouped = groups(frame)
    present = [m for m in MODALITIES if (grouped["modality"] == m).any()] or [IMAGES]
    fig = Figure(figsize=(7.5 * len(present), 5.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    colours = architecture_colours(grouped["model"].tolist())
    for ax, modality in zip(axes, present, strict=True):
        rows = grouped[grouped["modality"] == modality].dropna(subset=["accuracy", "leakage"])
        front = pareto_front(rows)
        ax.plot(front["leakage"], front["accuracy"], "-", color="0.3", linewidth=1.2, label="Pareto front")
        for _, row in rows.iterrows():
            on_front = row.name in front.index
            style = (
                {"marker": "D", "markersize": 8, "markeredgecolor": "black"} if on_front else {"marker": "o"}
            )
            ax.plot(row["leakage"], row["accuracy"], linestyle="none", color=colours[row["model"]], **style)
            ax.annotate(
                row["label"],
                (row["leakage"], row["accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        if rows.empty:
            ax.text(0.5, 0.5, "no ok cell with accuracy and leakage", ha="center", transform=ax.transAxes)
        ax.set_xlabel(f"{LEAKAGE_LABEL[modality]} (lower leaks less)")
        ax.set_ylabel("final server accuracy")
        ax.set_title(f"Accuracy–leakage: {modality} (◆ on the front)")
        ax.margins(0.15)
    return _save(fig, out / "pareto.png")


def reconstruction(compare_dir: Path, cell: pd.Series, name: str, out: Path) -> Path | None:
    """The cell's reconstruction grid (images) copied into the figures folder, from the audited
    round where its best attack scored highest; None where the run wrote none. Text cells have
    tables, not grids: see `text_table`."""
    source = audit_file(compare_dir, cell, ".png")
    if source is None:
        return None
    target = out / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def audit_file(compare_dir: Path, cell: pd.Series, suffix: str) -> Path | None:
    """audit/round-NNNN<suffix> of a cell's run: the round whose audit.csv row scored the highest
    leakage (PSNR, else token recall), else the last round written; None when there is none or
    the run directory lies outside the compare directory."""
    root = Path(compare_dir).resolve()
    run_dir = (root / str(cell["run_dir"])).resolve()
    if not run_dir.is_relative_to(root) or not (run_dir / "audit").is_dir():
        return None
    files = sorted((run_dir / "audit").glob(f"round-[0-9][0-9][0-9][0-9]{suffix}"))
    if not files:
        return None
    best = _best_round(run_dir / "audit.csv")
    chosen = run_dir / "audit" / f"round-{best:04d}{suffix}" if best is not None else None
    return chosen if chosen is not None and chosen.is_file() else files[-1]


def _best_round(audit_csv: Path) -> int | None:
    if not audit_csv.is_file():
        return None
    try:
        rows = pd.read_csv(audit_csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    for column in ("psnr", "token_recall"):
        if column in rows and "round" in rows:
            scored = rows.dropna(subset=[column, "round"])
            scored = scored[np.isfinite(pd.to_numeric(scored[column], errors="coerce"))]
            if not scored.empty:
                return int(scored.loc[pd.to_numeric(scored[column]).idxmax(), "round"])
    return None


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
