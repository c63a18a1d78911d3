"""Audit outputs: `audit.csv` rows and original-vs-reconstruction grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

AUDIT_COLUMNS = (
    "round",
    "partition_id",
    "attack",
    "threat",
    "psnr",
    "ssim",
    "label_correct",
    "rank_score",
    "seconds",
    "note",
)


def _to_display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] to something imshow draws: grey for one channel, RGB for three."""
    image = np.clip(image, 0.0, 1.0)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def save_grid(
    originals: np.ndarray,
    reconstructions: Mapping[str, np.ndarray],
    path: Path,
    captions: Mapping[str, Sequence[str]] | None = None,
    column_titles: Sequence[str] | None = None,
) -> None:
    """Row 0: the true samples; one row per attack below, each image captioned (e.g. its PSNR)."""
    rows = 1 + len(reconstructions)
    cols = len(originals)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 1.4, 1.7 * rows), squeeze=False)
    named_rows = [("true sample", originals), *reconstructions.items()]
    for r, (name, images) in enumerate(named_rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images) and images[c] is not None:
                ax.imshow(_to_display(images[c]), cmap="gray", vmin=0, vmax=1)
            if captions and name in captions and c < len(captions[name]):
                ax.set_xlabel(captions[name][c], fontsize=7)
            if r == 0 and column_titles:
                ax.set_title(column_titles[c], fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise_audit(path: Path) -> list[dict[str, Any]]:
    """Per attack over a whole run: rows, runs that produced an image, PSNR mean/max, label accuracy,
    and the first reason an attack could not run (e.g. it needs a batch-1 gradient)."""
    import pandas as pd

    frame = pd.read_csv(path)
    summary = []
    for attack, rows in frame.groupby("attack", sort=False):
        ran = rows.dropna(subset=["psnr"])
        labels = ran["label_correct"].dropna().astype(str) == "True"
        notes = rows["note"].dropna()
        summary.append(
            {
                "attack": attack,
                "updates": len(rows),
                "reconstructed": len(ran),
                "mean_psnr": float(ran["psnr"].mean()) if len(ran) else None,
                "max_psnr": float(ran["psnr"].max()) if len(ran) else None,
                "label_accuracy": float(labels.mean()) if len(labels) else None,
                "note": str(notes.iloc[0]) if len(notes) else "",
            }
        )
    return summary
