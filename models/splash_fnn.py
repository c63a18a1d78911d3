"""The splash-drop FNN of Yee, Yamanaka & Tagawa (arXiv 2201.09541; follow-up arXiv 2207.00971).

A feedforward network on the flattened side-view image, with zero hidden layers (the follow-up's
choice: the classifier is then one weight image per class) or one sigmoid hidden layer (the
precursor's). The paper's result is its weight map: the splash class's weights, reshaped to the
image, show the contour height of the drop's main body as a key feature. `class_weight_map`
returns that map and `save_weight_map` writes it as a PNG.

The network is one flat `nn.Sequential`, so the layer-wise attacks and the security metric walk it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: files only, the caller's backend untouched
from torch import nn

from models.base import InputSpec
from models.classifiers import SequentialClassifier

SPLASH_CLASS = 1  # the splash datasets' label for "splash"


class SplashFNN(SequentialClassifier):
    """Flatten → [Linear → Sigmoid] → Linear(classes): zero or one hidden layer."""

    def class_weight_map(self, target: int = SPLASH_CLASS) -> np.ndarray:
        """The weights of class `target` as an image (H, W): the input direction that raises its
        logit over the other classes' mean (for two classes W[target] − W[other], which is all a
        softmax over two logits depends on). Through a hidden layer the map is the product of
        the two weight matrices, i.e. the network with its sigmoid taken as linear (its
        first-order view around the sigmoid's centre). Channels are averaged."""
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        if not 0 <= target < self.spec.num_classes:
            raise ValueError(f"class {target} is not one of the model's {self.spec.num_classes} classes")
        with torch.no_grad():
            weights = linears[-1].weight
            for linear in reversed(linears[:-1]):
                weights = weights @ linear.weight
            others = torch.cat([weights[:target], weights[target + 1 :]]).mean(dim=0)
            direction = weights[target] - others
        return direction.reshape(self.spec.shape).mean(dim=0).numpy()


def splash_fnn(spec: InputSpec, hidden: int = 0) -> SplashFNN:
    """The splash FNN: `hidden=0` is the follow-up's zero-hidden-layer net (one linear map),
    `hidden=n` adds one sigmoid hidden layer of n units."""
    if hidden < 0:
        raise ValueError(f"splash-fnn hidden must be >= 0 (got {hidden}); 0 = no hidden layer, e.g. 16")
    if spec.num_classes < 2:
        raise ValueError("splash-fnn needs at least two classes (splash and no splash)")
    layers: list[nn.Module] = [nn.Flatten()]
    width = spec.num_features
    if hidden:
        layers += [nn.Linear(width, hidden), nn.Sigmoid()]
        width = hidden
    layers.append(nn.Linear(width, spec.num_classes))
    return SplashFNN(nn.Sequential(*layers), spec)


def save_weight_map(weight_map: np.ndarray, path: Path, title: str = "splash-class weights") -> Path:
    """Write a weight map as a PNG, diverging colours centred on zero (red raises the class)."""
    limit = float(np.abs(weight_map).max()) or 1.0
    figure = Figure(figsize=(4.2, 3.6))
    axes = figure.subplots()
    shown = axes.imshow(weight_map, cmap="RdBu_r", vmin=-limit, vmax=limit)
    figure.colorbar(shown, ax=axes)
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path
