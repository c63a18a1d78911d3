"""Architecture security against layer-wise gradient inversion: per-layer numerical rank.

R-GAP / COPA invert a batch-1 gradient layer by layer; a layer is attackable when its stacked
system [K; W; P] (gradient, weight and padding constraints on the zero-padded input) has full
column rank. Counting equations (the RA-i index) only bounds the rank from above: CNN6-d's second
conv has more equations than unknowns yet rank 4,052 of 4,332. So this audit measures the rank:

* each layer's system is built from the model's weights and an output gradient k (a seeded
  standard-normal draw by default, since the rank of K depends on k; pass observed ks to audit
  a particular update), with the same structured code the attack uses (`attacks.layerwise.systems`);
* rank = #{sigma_i > rtol * sigma_max} of the balanced system A = [alpha K; W] on the interior
  unknowns, plus one per padded unknown (each padding constraint fixes one unknown exactly);
  rtol = `attacks.layerwise.systems.RANK_RTOL` (1e-5, i.e. 1e-10 on the eigenvalues of A^T A);
* deficit = unknowns - rank, reported as a non-negative number (COPA's code uses rank - unknowns);
* score = COPA's net rank with that sign flipped: sum_i round(deficit_i * (L - i - 1) / (L - 1))
  over the L Linear/Conv layers counted from the input (i = 0 .. L - 1), so deficits near the
  input weigh most and the head weighs nothing. score > 0 means some layer is not uniquely
  invertible by layer-wise attacks (it says nothing about optimisation attacks);
* ra_index = E2EGI's count-based RA-i (max over layers of n_x - n_w - n_z - n_v, unpadded,
  n_w counting weights and biases), for comparison: <= 0 predicts "attackable".

Beyond Linear / Conv2d with invertible activations (R-GAP's setting), each layer's system comes
from `attacks.layerwise.network_plan` and `attacks.layerwise.layer_ops`, exactly as the attack builds it:

* the ops above a layer are pulled back from the values of a probe forward pass (a seeded random
  input unless `probe` is given): ReLU zeros drop weight equations and zero k; BatchNorm (eval)
  is affine; average pooling gives linear constraints; k is the draw pulled back through the ops;
* what the server cannot know is taken from the probe and the row says so (`upper_bound`: the
  rank then bounds leakage from above): max-pool winners, ReLU patterns under pooling, GELU/SiLU
  branches. Train-mode BatchNorm adds the batch's per-channel scale and mean as extra unknowns
  (`extra_unknowns`; the system is homogeneous, so the deficit is at least 1: the scale);
* layers other than plain Conv2d / Linear (dilated or grouped convs, Conv1d, Embedding, ...) use
  the autograd-built systems of `attacks.layerwise.generic_systems`;
* modules that cannot be treated (residual blocks, attention, ...) and the layers whose output
  passes through them are listed in `untreated` instead of raising: the report is then partial
  (`complete` is False) and points to the end-to-end identifiability.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from attacks.base import AttackError
from attacks.layerwise import (
    DEFAULT_BLAS_THREADS,
    RANK_RTOL,
    NetworkPlan,
    PlannedLayer,
    blas_threads,
    constrained_rank,
    layer_rank,
    plan_network,
    pull_back,
    weight_of,
)
from models.base import model_label

if TYPE_CHECKING:
    import pandas as pd

TOLERANCE_RULE = "sigma_i > rtol * sigma_max of the balanced interior system [alpha K; W]"


@dataclass(frozen=True)
class LayerRank:
    """One Linear/Conv2d layer's system: sizes, numerical rank and the count-based RA_i^v."""

    index: int
    module: int
    kind: str
    unknowns: int
    interior_unknowns: int
    equations: int
    rank: int
    deficit: int
    ra: int
    sigma_min: float
    sigma_max: float
    method: str
    seconds: float
    treatment: str = ""  # how the ops above were pulled back (empty: invertible activations only)
    upper_bound: bool = False  # the rank assumes hidden quantities known: leakage bounded from above
    extra_unknowns: int = 0  # batch statistics of a train-mode BatchNorm, counted in `unknowns`


@dataclass(frozen=True)
class UntreatedPart:
    """A module, or a layer, the layer-wise analysis could not treat, and why."""

    module: int  # index in model.layers
    kind: str
    note: str


@dataclass
class SecurityReport:
    """Per-layer ranks plus COPA's weighted score and E2EGI's RA-i, with the tolerance used."""

    model: str
    input_shape: tuple[int, ...]
    layers: list[LayerRank]
    score: int
    ra_index: int
    tolerance: float
    tolerance_rule: str = TOLERANCE_RULE
    seed: int | None = 0
    seconds: float = 0.0
    untreated: list[UntreatedPart] = field(default_factory=list)

    @property
    def deficient_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.deficit > 0]

    @property
    def complete(self) -> bool:
        """False when some module or layer could not be treated layer-wise (see `untreated`)."""
        return not self.untreated

    @property
    def upper_bound(self) -> bool:
        """True when some row's rank assumes hidden quantities known (max-pool winners, ...)."""
        return any(layer.upper_bound for layer in self.layers)

    @property
    def invertible(self) -> bool:
        """True when every layer was treated and its system has full rank (layer-wise inversion
        is well-posed, given what `upper_bound` rows assume)."""
        return self.complete and not self.deficient_layers

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["deficient_layers"] = self.deficient_layers
        out["invertible"] = self.invertible
        out["complete"] = self.complete
        out["upper_bound"] = self.upper_bound
        return out

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame([asdict(layer) for layer in self.layers])

    def to_table(self) -> str:
        """A plain-text table (no pandas needed) with the summary lines underneath."""
        header = ("layer", "type", "unknowns", "equations", "rank", "deficit", "RA_i^v", "sigma_min/max", "s")
        rows = [_row(r) for r in self.layers]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        lines.append(
            f"score (COPA, deficits >= 0, input-weighted) = {self.score}; "
            f"RA-i (E2EGI, counts) = {self.ra_index}; "
            f"tolerance: {self.tolerance_rule}, rtol = {self.tolerance:g}"
        )
        lines += [
            f"layer {r.index} ({r.kind}, module {r.module}): {r.treatment}"
            for r in self.layers
            if r.treatment
        ]
        if self.upper_bound:
            lines.append(
                "* rank assumes hidden quantities known: an upper bound on leakage (lower bound on deficit)"
            )
        lines += [part.note for part in self.untreated]
        return "\n".join(lines)


def _row(r: LayerRank) -> tuple[str, ...]:
    ratio = f"{r.sigma_min / r.sigma_max:.2e}" if r.sigma_max > 0 else "-"
    values = (
        r.index,
        r.kind,
        r.unknowns,
        r.equations,
        f"{r.rank}{'*' if r.upper_bound else ''}",
        r.deficit,
        r.ra,
    )
    return (*(str(v) for v in values), ratio, f"{r.seconds:.2f}")


def copa_score(deficits: list[int]) -> int:
    """sum_i round(deficit_i * (L - i - 1) / (L - 1)), layers counted from the input."""
    count = len(deficits)
    if count < 2:
        return 0
    return int(sum(round(d * (count - i - 1) / (count - 1)) for i, d in enumerate(deficits)))


def ra_counts(layers: list[PlannedLayer]) -> list[int]:
    """E2EGI's RA_i^v per layer: n_x - n_w - n_z - n_v, with virtual constraints n_v accumulated."""
    n_v = 0
    out = []
    for layer in layers:
        n_x = layer.bilinear.unknowns
        n_z = int(np.prod(layer.out_shape))
        n_w = sum(p.numel() for p in layer.module.parameters() if p.requires_grad)
        ra = n_x - n_w - n_z
        out.append(ra - n_v)
        n_v += max(max(n_z - n_x, 0) - max(ra, 0), 0)
    return out


def _rank_row(
    layer: PlannedLayer, ra: int, draw: np.ndarray, k: np.ndarray | None, probe: _Probe, rtol: float
) -> LayerRank:
    """Rank of one layer's system, counted on the padded unknowns as R-GAP and COPA report it.

    `draw` is a standard-normal dL/d(input of the next layer), pulled back through the ops above
    with the probe's values; `k` (observed dL/dz) replaces the pulled-back gradient when given.
    """
    start = time.perf_counter()
    ops = layer.post
    oracle = [probe.inputs[i] for i, _, _ in ops] + [probe.top(layer)]
    pulled = pull_back(ops, oracle[-1], draw, oracle=oracle)
    k = pulled.k if k is None else np.asarray(k, dtype=np.float64)
    cons = pulled.constraints
    geom = layer.geometry
    if geom is not None and cons.is_full:
        info = layer_rank(geom, weight_of(layer), k, rtol)
        equations = geom.weight_count + geom.out_size
    else:
        x = probe.layer_input(layer)
        grad_w = layer.bilinear.weight_gradient(k, x[None])[0] if cons.extra_count else None
        info, parts = constrained_rank(layer.bilinear, geom, k, cons, grad_w, rtol)
        equations = parts.equations
    padding = layer.padding_unknowns
    return LayerRank(
        index=layer.index,
        module=layer.module_index,
        kind=layer.kind,
        unknowns=layer.unknowns + cons.extra_count,
        interior_unknowns=layer.bilinear.unknowns,
        equations=equations + padding,
        rank=info.rank + padding,
        deficit=info.deficit,
        ra=ra,
        sigma_min=info.sigma_min,
        sigma_max=info.sigma_max,
        method=info.method,
        seconds=time.perf_counter() - start,
        treatment=pulled.treatment,
        upper_bound=pulled.upper_bound,
        extra_unknowns=cons.extra_count,
    )


@dataclass
class _Probe:
    """The input of every module of `model.layers` (and the output) on one probe sample."""

    inputs: list[np.ndarray]
    plan: NetworkPlan

    def top(self, layer: PlannedLayer) -> np.ndarray:
        """The tensor the ops above `layer` produce: the next layer's input (or the logits)."""
        end = layer.post[-1][0] + 1 if layer.post else layer.module_index + 1
        return self.inputs[end]

    def layer_input(self, layer: PlannedLayer) -> np.ndarray:
        x = self.inputs[layer.module_index]
        if isinstance(layer.module, nn.Embedding):  # the unknown is the one-hot token matrix
            return np.eye(layer.module.num_embeddings)[x.astype(np.int64)].ravel()
        return x.ravel()


def _probe_input(model: nn.Module, plan: NetworkPlan, seed: int | None) -> torch.Tensor:
    """A seeded random sample: token ids, or uniform in the model's value range (else N(0, 1))."""
    rng = np.random.default_rng(None if seed is None else [seed, 1])
    shape = (1, *plan.input_shape)
    first = plan.layers[0].module if not plan.pre else None
    if isinstance(first, nn.Embedding):
        return torch.from_numpy(rng.integers(0, first.num_embeddings, size=shape))
    spec = getattr(model, "spec", None)
    value_range = getattr(spec, "value_range", None)
    dtype = next(model.parameters()).dtype
    if value_range is None:
        return torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    return torch.from_numpy(rng.uniform(value_range[0], value_range[1], size=shape)).to(dtype)


def _run_probe(model: nn.Module, plan: NetworkPlan, probe: Any, seed: int | None) -> _Probe:
    """One batch-1 forward pass on a copy, in the model's own modes (train-mode BatchNorm uses the
    probe's statistics, as a client's batch-1 gradient does); the model itself is untouched."""
    x = _probe_input(model, plan, seed) if probe is None else torch.as_tensor(np.asarray(probe))
    x = x.reshape(1, *plan.input_shape)
    if x.is_floating_point():
        x = x.to(next(model.parameters()).dtype)
    twin = copy.deepcopy(model)
    inputs = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        for index, module in enumerate(twin.layers):
            inputs.append(x[0].double().numpy())
            try:
                x = module(x)
            except Exception as err:
                raise AttackError(
                    f"layer {index} ({type(module).__name__}) fails on a batch-1 probe: {err}"
                ) from err
    inputs.append(x[0].double().numpy())
    return _Probe(inputs, plan)


def _top_shape(plan: NetworkPlan, layer: PlannedLayer) -> tuple[int, ...]:
    """Shape of dL/d(next layer's input), where the standard-normal draw is made (for R-GAP's
    nets the layer's own output, reshaped: the draws are the same numbers as before pooling,
    ReLU and BatchNorm were treated)."""
    if layer.index + 1 < len(plan.layers):
        return plan.layers[layer.index + 1].in_shape
    return layer.out_shape


def security_report(
    model: nn.Module,
    input_shape: tuple[int, ...],
    seed: int | None = 0,
    ks: Mapping[int, np.ndarray] | None = None,
    rtol: float = RANK_RTOL,
    threads: int | None = DEFAULT_BLAS_THREADS,
    probe: Any = None,
) -> SecurityReport:
    """Audit `model` (flat `model.layers`) on inputs of `input_shape` (no batch dimension).

    ks: optional observed output gradients per layer index (counted from the input); layers
    without one get a standard-normal draw from `np.random.default_rng(seed)`, pulled back
    through the ops above the layer.
    threads: BLAS threads while factorising (None leaves the process setting alone).
    probe: one input sample (no batch dim) whose forward pass fixes ReLU patterns, pooling
    winners and batch statistics; default a seeded random sample.
    Modules the analysis cannot treat are listed in `untreated` (a partial report); raises
    attacks.base.AttackError only when the model is no chain of layers ending in a Linear head.
    """
    with blas_threads(threads):
        return _report(model, tuple(input_shape), seed, ks, rtol, probe)


def _report(
    model: nn.Module,
    input_shape: tuple[int, ...],
    seed: int | None,
    ks: Mapping[int, np.ndarray] | None,
    rtol: float,
    probe: Any,
) -> SecurityReport:
    start = time.perf_counter()
    plan = plan_network(model, tuple(input_shape))
    values = _run_probe(model, plan, probe, seed)
    rng = np.random.default_rng(seed)
    ras = ra_counts(list(plan.layers))
    rows: list[LayerRank] = []
    untreated = [UntreatedPart(u.index, u.kind, u.message) for u in plan.untreated]
    for layer, ra in zip(plan.layers, ras, strict=True):
        draw = rng.standard_normal(_top_shape(plan, layer))  # drawn for every layer: seeds stay aligned
        if layer.untreated is not None:
            untreated.append(
                UntreatedPart(
                    layer.module_index,
                    layer.kind,
                    f"layer {layer.module_index} ({layer.kind}): {layer.untreated}",
                )
            )
            continue
        k = ks.get(layer.index) if ks else None
        try:
            rows.append(_rank_row(layer, ra, draw, k, values, rtol))
        except AttackError as err:
            note = f"layer {layer.module_index} ({layer.kind}): not treated layer-wise: {err}"
            untreated.append(UntreatedPart(layer.module_index, layer.kind, note))
    deficits = {r.index: r.deficit for r in rows}
    return SecurityReport(
        model=model_label(model),
        input_shape=tuple(input_shape),
        layers=rows,
        score=copa_score([deficits.get(layer.index, 0) for layer in plan.layers]),
        ra_index=max(ras),
        tolerance=rtol,
        seed=seed,
        seconds=time.perf_counter() - start,
        untreated=sorted(untreated, key=lambda part: part.module),
    )
