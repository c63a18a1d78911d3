"""The network as layer-wise inversion sees it: layers, the ops between them, and what it cannot treat.

A *layer* is a module whose output is bilinear in (input, weight): Linear, Conv1d/2d/3d, and an
Embedding at the input. Between two layers sit *ops* that `attacks.layerwise.layer_ops` pulls back (ReLU,
BatchNorm, pooling, reshapes, activations). Any other module (a residual block, attention, a
custom module) is *untreated*: it is named, and every layer whose output reaches the next layer
through it is marked, so that the security report can say so and the attack can decline, instead
of producing garbage. Such parts are covered by the end-to-end identifiability instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attacks.base import AttackError, parameter_layers
from attacks.layerwise.generic_systems import BILINEAR_MODULES, BilinearLayer, bilinear_layer_of
from attacks.layerwise.layer_ops import Op, op_kind
from attacks.layerwise.systems import ConvGeometry, geometry_of
from models.base import ZooModel

E2E_POINTER = "see the end-to-end identifiability"


@dataclass(frozen=True)
class UntreatedModule:
    """A module the layer-wise analysis cannot treat, and why."""

    index: int  # position in model.layers
    kind: str
    reason: str

    @property
    def message(self) -> str:
        return f"layer {self.index} ({self.kind}): not treated layer-wise — {E2E_POINTER} ({self.reason})"


@dataclass(frozen=True)
class PlannedLayer:
    """One layer and the ops that follow it up to the next layer."""

    index: int  # position among layers, 0 = closest to the input
    module_index: int  # index in model.layers
    module: nn.Module
    geometry: ConvGeometry | None  # the structured path (plain Conv2d, Linear on vectors); else None
    bilinear: BilinearLayer  # the generic (autograd) form, always available
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    post: tuple[Op, ...]  # (module index, op, op input shape)
    weight_name: str
    bias_name: str | None
    untreated: str | None = None  # why the ops above cannot be pulled back, if they cannot

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def channels_first(self) -> bool:
        """Bias (and BatchNorm channels) along axis 0 of the output (convs), else the last axis."""
        return not isinstance(self.module, (nn.Linear, nn.Embedding))

    @property
    def unknowns(self) -> int:
        """Unknowns as R-GAP / COPA count them (zero-padded input for convs)."""
        return self.geometry.padded_unknowns if self.geometry is not None else self.bilinear.padded_unknowns

    @property
    def padding_unknowns(self) -> int:
        return self.geometry.padding_unknowns if self.geometry is not None else self.bilinear.padding_unknowns


@dataclass(frozen=True)
class NetworkPlan:
    """Layers in forward order, the ops before the first one, and the untreated modules."""

    input_shape: tuple[int, ...]
    pre: tuple[Op, ...]
    layers: tuple[PlannedLayer, ...]
    untreated: tuple[UntreatedModule, ...] = ()

    @property
    def head(self) -> PlannedLayer:
        return self.layers[-1]


def _shapes(model: ZooModel, modules: list[tuple[str, nn.Module]], input_shape: tuple[int, ...]) -> list:
    """The input shape of every module and the output shape, from one dummy forward pass in eval
    mode (train-mode BatchNorm would update its running statistics; modes are restored)."""
    first = modules[0][1] if modules else None
    dtype = torch.long if isinstance(first, nn.Embedding) else next(model.parameters()).dtype
    x = torch.zeros((1, *input_shape), dtype=dtype)
    modes = [(m, m.training) for m in model.modules()]
    shapes: list[tuple[int, ...]] = []
    try:
        model.eval()
        with torch.no_grad():
            for index, (_, module) in enumerate(modules):
                shapes.append(tuple(x.shape[1:]))
                try:
                    x = module(x)
                except Exception as err:  # shapes the model cannot take are the caller's error
                    raise AttackError(
                        f"layer {index} ({type(module).__name__}) fails on {shapes[-1]}: {err}"
                    ) from err
    finally:
        for module, mode in modes:
            module.training = mode
    return [*shapes, tuple(x.shape[1:])]


def _is_layer(index: int, module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return index == 0  # token ids only at the input
    return isinstance(module, BILINEAR_MODULES)


def _untreated(index: int, module: nn.Module) -> UntreatedModule:
    kind = type(module).__name__
    if isinstance(module, nn.Embedding):
        reason = "an embedding inside the network takes token ids computed by the layers below"
    elif any(True for _ in module.children()):
        reason = "a composite module (e.g. a residual block) is not a chain of layers and ops"
    else:
        reason = "no pull-back is known for this operation"
    return UntreatedModule(index, kind, reason)


def plan_network(model: ZooModel, input_shape: tuple[int, ...]) -> NetworkPlan:
    """Walk `model.layers` (a flat nn.Sequential) for inputs of `input_shape` (no batch dim)."""
    modules = parameter_layers(model)
    shapes = _shapes(model, modules, tuple(input_shape))
    untreated = tuple(
        _untreated(i, m) for i, (_, m) in enumerate(modules) if not _is_layer(i, m) and op_kind(m) is None
    )
    blocked = {u.index: u for u in untreated}
    layer_at = [i for i, (_, m) in enumerate(modules) if _is_layer(i, m)]
    if not layer_at or layer_at[-1] != len(modules) - 1 or not isinstance(modules[-1][1], nn.Linear):
        raise AttackError("layer-wise inversion needs the network to end in a Linear head (logits)")
    pre = tuple((i, modules[i][1], shapes[i]) for i in range(layer_at[0]))
    layers = []
    for li, mi in enumerate(layer_at):
        prefix, module = modules[mi]
        end = layer_at[li + 1] if li + 1 < len(layer_at) else len(modules)
        post = tuple((j, modules[j][1], shapes[j]) for j in range(mi + 1, end))
        stops = [blocked[j] for j in range(mi + 1, end) if j in blocked]
        reason = None
        if stops:
            names = ", ".join(f"layer {u.index} ({u.kind})" for u in stops)
            reason = (
                f"its output reaches the next layer through {names}, not treated layer-wise — {E2E_POINTER}"
            )
        in_shape = shapes[mi]
        geometry = None
        if isinstance(module, nn.Conv2d) or (isinstance(module, nn.Linear) and len(in_shape) == 1):
            try:
                geometry = geometry_of(module, in_shape, mi)
            except AttackError:
                geometry = None  # grouped / dilated / padded otherwise: the generic path
        layers.append(
            PlannedLayer(
                index=li,
                module_index=mi,
                module=module,
                geometry=geometry,
                bilinear=bilinear_layer_of(module, in_shape, mi),
                in_shape=in_shape,
                out_shape=shapes[mi + 1],
                post=post,
                weight_name=f"{prefix}.weight",
                bias_name=f"{prefix}.bias" if getattr(module, "bias", None) is not None else None,
                untreated=reason,
            )
        )
    return NetworkPlan(tuple(input_shape), pre, tuple(layers), untreated)


def weight_of(layer: PlannedLayer) -> np.ndarray:
    """The layer's weight as float64, conv-shaped (C_out, C_in, kh, kw) or (out, in) for Linear."""
    return layer.module.weight.detach().double().cpu().numpy()
