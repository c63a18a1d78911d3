"""The learned idf-like function g(tpr, fpr) as a picture: the paper's way of showing what LTW
learned. Two panels: the whole unit square, and the corner where real terms live (most terms
occur in few documents), with the model's own terms drawn on it when its counts are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from models.learning_to_weight import LearningToWeight, rates

ZOOM = 0.1


@torch.no_grad()
def g_grid(model: LearningToWeight, limit: float, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(axis values, g on the grid) with g[i, j] = g(tpr = axis[j], fpr = axis[i])."""
    axis = np.linspace(0.0, limit, resolution, dtype=np.float32)
    tpr, fpr = np.meshgrid(axis, axis)
    points = torch.from_numpy(np.stack([tpr, fpr], axis=-1))
    was_training = model.training
    model.eval()
    values = model.g(points).squeeze(-1).numpy()
    model.train(was_training)
    return axis, values


def save_g_surface(model: LearningToWeight, path: Path, resolution: int = 81) -> Path:
    """Write the g surface (heat maps with contours) as a PNG at `path`; returns the path."""
    figure = Figure(figsize=(10, 4.4))
    for index, limit in enumerate((1.0, ZOOM)):
        ax = figure.add_subplot(1, 2, index + 1)
        axis, values = g_grid(model, limit, resolution)
        image = ax.pcolormesh(axis, axis, values, shading="auto", cmap="viridis")
        ax.contour(axis, axis, values, levels=8, colors="white", linewidths=0.5)
        figure.colorbar(image, ax=ax, label="g(tpr, fpr)")
        ax.plot([0, limit], [0, limit], color="red", linewidth=0.8, linestyle="--")
        if index == 1 and model.counts_known():
            tpr, fpr = rates(model.term_class_df, model.class_docs)
            keep = (tpr <= limit) & (fpr <= limit) & ((tpr > 0) | (fpr > 0))
            ax.scatter(tpr[keep].numpy(), fpr[keep].numpy(), s=1, color="black", alpha=0.15)
        ax.set_xlabel("tpr = P(t | c)")
        ax.set_ylabel("fpr = P(t | not c)")
        ax.set_title("learned g on [0, 1]²" if index == 0 else f"zoom [0, {limit}]², dots: the terms")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
