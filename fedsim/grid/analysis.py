"""The numbers the report states: leakage per cell, architecture × defence groups, the
accuracy–leakage Pareto front, the chosen setting and how far the PSNR ceiling was from the attack.

Leakage has two units that are never mixed: images are scored by the best attack's PSNR (dB),
token data by the best attack's token recall (0..1). Each cell gets a modality from the leakage
columns it has (a cell without any takes its dataset's modality from the other cells), and every
comparison below is made within one modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

IMAGES, TEXT = "images", "text"
MODALITIES = (IMAGES, TEXT)
LEAKAGE_COLUMN = {IMAGES: "best_psnr", TEXT: "token_recall"}
LEAKAGE_LABEL = {IMAGES: "best attack PSNR (dB)", TEXT: "best attack token recall"}
DEFAULT_MARGIN = 0.05  # the default target accuracy: the best group's accuracy minus 5 points
MIN_RANK_PAIRS = 3  # Spearman's ρ of two points is ±1 whatever they are: not reported


def with_modality(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` plus `modality` (images / text / '' when nothing says) and `leakage` (the
    modality's leakage value, NaN when not measured) and `dp` (ε is finite)."""
    out = frame.copy()
    text = out["token_recall"].notna() | out["rouge1"].notna()
    images = out["best_psnr"].notna() | out["best_ssim"].notna() | out["psnr_ceiling"].notna()
    out["modality"] = np.where(text, TEXT, np.where(images, IMAGES, ""))
    known = out[out["modality"] != ""].groupby("dataset")["modality"].first()
    unknown = out["modality"] == ""
    out.loc[unknown, "modality"] = out.loc[unknown, "dataset"].map(known).fillna("")
    out["leakage"] = [
        row[LEAKAGE_COLUMN[row["modality"]]] if row["modality"] in LEAKAGE_COLUMN else math.nan
        for _, row in out.iterrows()
    ]
    out["dp"] = out["epsilon"].notna() & np.isfinite(out["epsilon"].fillna(np.inf))
    return out


def groups(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per architecture × dataset × defence over the ok cells: mean accuracy and leakage
    over the seeds that measured them, ε (mean; NaN = no DP), and how many seeds ran."""
    ok = with_modality(frame[frame["status"] == "ok"])
    keys = ["model", "dataset", "defence"]
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "modality", "accuracy", "leakage", "epsilon", "seeds", "label"])
    grouped = ok.groupby(keys, sort=True, dropna=False).agg(
        modality=("modality", "first"),
        accuracy=("accuracy", "mean"),
        leakage=("leakage", "mean"),
        epsilon=("epsilon", lambda e: e[np.isfinite(e)].mean() if np.isfinite(e).any() else math.nan),
        seeds=("seed", "count"),
    )
    grouped = grouped.reset_index()
    several_datasets = grouped.groupby("model")["dataset"].nunique().max() > 1
    grouped["label"] = [
        f"{m} / {d} / {f}" if several_datasets else f"{m} / {f}"
        for m, d, f in zip(grouped["model"], grouped["dataset"], grouped["defence"], strict=True)
    ]
    return grouped


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """The rows no other row beats: none has accuracy ≥ and leakage ≤ with one of them strict.
    Rows missing either value are not candidates. Sorted by leakage."""
    rows = points.dropna(subset=["accuracy", "leakage"])
    acc, leak = rows["accuracy"].to_numpy(), rows["leakage"].to_numpy()
    keep = [
        not np.any((acc >= a) & (leak <= lk) & ((acc > a) | (leak < lk)))
        for a, lk in zip(acc, leak, strict=True)
    ]
    return rows.loc[np.array(keep, dtype=bool)].sort_values(["leakage", "accuracy"], ascending=[True, False])


@dataclass(frozen=True)
class Choice:
    """The summary's answer for one modality."""

    modality: str
    target_accuracy: float | None  # None: no group measured accuracy
    target_default: bool  # True: the best accuracy minus DEFAULT_MARGIN
    best_accuracy: float | None
    chosen: pd.Series | None  # a row of `groups`, None when no group reaches the target with leakage
    reaching: int  # groups at or above the target
    reaching_measured: int  # of those, groups with a measured leakage


def choose(grouped: pd.DataFrame, modality: str, target_accuracy: float | None = None) -> Choice:
    """The group of `modality` that reaches the target accuracy with the least measured leakage
    (ties: the higher accuracy, then the label). The default target is this modality's best
    group accuracy minus 5 points: accuracies of different tasks are not compared."""
    rows = grouped[(grouped["modality"] == modality) & grouped["accuracy"].notna()]
    best = float(rows["accuracy"].max()) if not rows.empty else None
    target = target_accuracy
    if target is None and best is not None:
        target = best - DEFAULT_MARGIN
    if target is None:
        return Choice(modality, None, target_accuracy is None, None, None, 0, 0)
    reaching = rows[rows["accuracy"] >= target - 1e-12]
    measured = reaching.dropna(subset=["leakage"])
    ranked = measured.assign(neg_acc=-measured["accuracy"]).sort_values(["leakage", "neg_acc", "label"])
    chosen = None if ranked.empty else ranked.iloc[0].drop("neg_acc")
    return Choice(modality, target, target_accuracy is None, best, chosen, len(reaching), len(measured))


@dataclass(frozen=True)
class PredictionError:
    """How far the noise-calibrated PSNR ceiling was from the measured best PSNR (image cells)."""

    pairs: int
    median_abs_db: float | None
    spearman: float | None  # None with fewer than MIN_RANK_PAIRS pairs or a constant side


def prediction_error(frame: pd.DataFrame) -> PredictionError:
    """Over the ok cells with both a ceiling and a measured PSNR: median |ceiling − PSNR| and
    Spearman's rank correlation between them."""
    ok = frame[frame["status"] == "ok"].dropna(subset=["psnr_ceiling", "best_psnr"])
    ceiling, measured = ok["psnr_ceiling"].to_numpy(float), ok["best_psnr"].to_numpy(float)
    if len(ok) == 0:
        return PredictionError(0, None, None)
    median = float(np.median(np.abs(ceiling - measured)))
    constant = np.ptp(ceiling) == 0 or np.ptp(measured) == 0
    rho = None if len(ok) < MIN_RANK_PAIRS or constant else float(spearmanr(ceiling, measured).statistic)
    return PredictionError(len(ok), median, rho)


def extremes(frame: pd.DataFrame, modality: str) -> tuple[pd.Series | None, pd.Series | None]:
    """The most and the least leaky ok cell of `modality` (by its own leakage; ties by cell id)."""
    cells = with_modality(frame[frame["status"] == "ok"])
    cells = cells[(cells["modality"] == modality) & cells["leakage"].notna()].sort_values(["leakage", "cell"])
    if cells.empty:
        return None, None
    return cells.iloc[-1], cells.iloc[0]
