"""Prototype pictures as the reference draws them (push.py, find_high_activation_crop): each
prototype's source image, its similarity map upsampled (bicubic) to the image size as a jet
overlay, and the tightest box around the pixels at or above the map's 95th percentile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch.nn import functional as F

from models.protopnet import SIMILARITY_EPSILON, ProtoPNet

PERCENTILE = 95


@torch.no_grad()
def similarity_map(model: ProtoPNet, image: torch.Tensor, prototype: int) -> np.ndarray:
    """log((d + 1) / (d + ε)) of `prototype` at every latent position of `image` (C, H, W),
    bicubic-upsampled to (H, W)."""
    distances = model.distance_maps(model.latent(image[None]))[:, prototype : prototype + 1]
    similarity = torch.log((distances + 1) / (distances + SIMILARITY_EPSILON))
    return F.interpolate(similarity, size=image.shape[1:], mode="bicubic", align_corners=False)[0, 0].numpy()


def high_activation_box(activation: np.ndarray, percentile: float = PERCENTILE) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), end-exclusive: the tightest box holding every pixel at or above
    `percentile` of `activation`."""
    rows, cols = np.nonzero(activation >= np.percentile(activation, percentile))
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def save_prototype_figure(
    model: ProtoPNet,
    images: torch.Tensor,
    sources: np.ndarray,
    path: Path,
    class_names: list[str] | None = None,
) -> Path:
    """One panel per prototype (a row per class): `images[sources[j]]` with prototype j's
    similarity map and its 95th-percentile box; written as a PNG to `path`."""
    classes = model.prototype_classes().numpy()
    per_class = int(np.bincount(classes).max())
    count = int(classes.max()) + 1
    figure = Figure(figsize=(1.8 * per_class, 1.8 * count))
    axes = figure.subplots(count, per_class, squeeze=False)
    slot = np.zeros(count, dtype=int)
    for j, k in enumerate(classes):
        ax = axes[k, slot[k]]
        slot[k] += 1
        ax.axis("off")
        if sources[j] < 0:
            ax.set_title(f"p{j}: no source", fontsize=7)
            continue
        image = images[int(sources[j])]
        activation = similarity_map(model, image, j)
        ax.imshow(image.mean(dim=0).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.imshow(activation, cmap="jet", alpha=0.35)
        r0, r1, c0, c1 = high_activation_box(activation)
        ax.add_patch(
            Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="yellow", lw=1.5)
        )
        label = class_names[k] if class_names else f"class {k}"
        ax.set_title(f"p{j} {label}", fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
