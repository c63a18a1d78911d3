"""Architecture security against layer-wise gradient inversion: per-layer numerical rank.

R-GAP / COPA invert a batch-1 gradient layer by layer; a layer is attackable when its stacked
system [K; W; P] (gradient, weight and padding constraints on the zero-padded input) has full
column rank. Counting equations (the RA-i index) only bounds the rank from above: CNN6-d's second
conv has more equations than unknowns yet rank 4,052 of 4,332. So this audit measures the rank:

* each layer's system is built from the model's weights and an output gradient k (a seeded
  standard-normal draw by default, since the rank of K depends on k; pass observed ks to audit
  a particular update), with the same structured code the attack uses (`attacks.layerwise_systems`);
* rank = #{sigma_i > rtol * sigma_max} of the balanced system A = [alpha K; W] on the interior
  unknowns, plus one per padded unknown (each padding constraint fixes one unknown exactly);
  rtol = `attacks.layerwise_systems.RANK_RTOL` (1e-5, i.e. 1e-10 on the eigenvalues of A^T A);
* deficit = unknowns - rank, reported as a non-negative number (COPA's code uses rank - unknowns);
* score = COPA's net rank with that sign flipped: sum_i round(deficit_i * (L - i - 1) / (L - 1))
  over the L Linear/Conv layers counted from the input (i = 0 .. L - 1), so deficits near the
  input weigh most and the head weighs nothing. score > 0 means some layer is not uniquely
  invertible by layer-wise attacks (it says nothing about optimisation attacks);
* ra_index = E2EGI's count-based RA-i (max over layers of n_x - n_w - n_z - n_v, unpadded,
  n_w counting weights and biases), for comparison: <= 0 predicts "attackable".
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from attacks.layerwise_systems import (
    DEFAULT_BLAS_THREADS,
    RANK_RTOL,
    PlannedLayer,
    blas_threads,
    layer_rank,
    plan_network,
    weight_of,
)

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

    @property
    def deficient_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.deficit > 0]

    @property
    def invertible(self) -> bool:
        """True when every layer's system has full rank (layer-wise inversion is well-posed)."""
        return not self.deficient_layers

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["deficient_layers"] = self.deficient_layers
        out["invertible"] = self.invertible
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
        return "\n".join(lines)


def _row(r: LayerRank) -> tuple[str, ...]:
    ratio = f"{r.sigma_min / r.sigma_max:.2e}" if r.sigma_max > 0 else "-"
    values = (r.index, r.kind, r.unknowns, r.equations, r.rank, r.deficit, r.ra)
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
        n_x = int(np.prod(layer.in_shape))
        n_z = int(np.prod(_linear_out_shape(layer)))
        n_w = sum(p.numel() for p in layer.module.parameters() if p.requires_grad)
        ra = n_x - n_w - n_z
        out.append(ra - n_v)
        n_v += max(max(n_z - n_x, 0) - max(ra, 0), 0)
    return out


def _linear_out_shape(layer: PlannedLayer) -> tuple[int, ...]:
    geom = layer.geometry
    if geom.is_linear:
        return (geom.out_channels,)
    return (geom.out_channels, geom.out_height, geom.out_width)


def _rank_row(layer: PlannedLayer, ra: int, k: np.ndarray, rtol: float) -> LayerRank:
    """Rank of one layer's [K; W; P], counted on the padded unknowns as R-GAP and COPA report it."""
    start = time.perf_counter()
    geom = layer.geometry
    info = layer_rank(geom, weight_of(layer), k, rtol)
    return LayerRank(
        index=layer.index,
        module=layer.module_index,
        kind=layer.kind,
        unknowns=geom.padded_unknowns,
        interior_unknowns=geom.unknowns,
        equations=geom.weight_count + geom.out_size + geom.padding_unknowns,
        rank=info.rank + geom.padding_unknowns,
        deficit=info.deficit,
        ra=ra,
        sigma_min=info.sigma_min,
        sigma_max=info.sigma_max,
        method=info.method,
        seconds=time.perf_counter() - start,
    )


def security_report(
    model: nn.Module,
    input_shape: tuple[int, ...],
    seed: int | None = 0,
    ks: Mapping[int, np.ndarray] | None = None,
    rtol: float = RANK_RTOL,
    threads: int | None = DEFAULT_BLAS_THREADS,
) -> SecurityReport:
    """Audit `model` (flat `model.layers`) on inputs of `input_shape` (no batch dimension).

    ks: optional observed output gradients per layer index (counted from the input); layers
    without one get a standard-normal k from `np.random.default_rng(seed)`.
    threads: BLAS threads while factorising (None leaves the process setting alone).
    Raises attacks.base.AttackError for layers layer-wise inversion cannot handle.
    """
    with blas_threads(threads):
        return _report(model, tuple(input_shape), seed, ks, rtol)


def _report(
    model: nn.Module,
    input_shape: tuple[int, ...],
    seed: int | None,
    ks: Mapping[int, np.ndarray] | None,
    rtol: float,
) -> SecurityReport:
    start = time.perf_counter()
    plan = plan_network(model, tuple(input_shape))
    rng = np.random.default_rng(seed)
    ras = ra_counts(list(plan.layers))
    rows = []
    for layer, ra in zip(plan.layers, ras, strict=True):
        draw = rng.standard_normal(_linear_out_shape(layer))  # drawn for every layer: seeds stay aligned
        k = np.asarray(ks[layer.index], dtype=np.float64) if ks and layer.index in ks else draw
        rows.append(_rank_row(layer, ra, k, rtol))
    return SecurityReport(
        model=str(getattr(model, "name", type(model).__name__)),
        input_shape=tuple(input_shape),
        layers=rows,
        score=copa_score([r.deficit for r in rows]),
        ra_index=max(ras),
        tolerance=rtol,
        seed=seed,
        seconds=time.perf_counter() - start,
    )
