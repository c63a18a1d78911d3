"""How many linear regions a piecewise-linear network realises near the data, beside the most
its widths and depth allow.

The rectified linear complexity of Lei, Luo, Yau & Gu (*Geometric Understanding of Deep
Learning*, arXiv 1805.10451) is the number of linear pieces ("cells") of the map a ReLU network
computes, maximised over its weights. For one trained network we measure the pieces it actually
has where the data live, and state the arrangement upper bound next to it.

**Activation pattern.** Every input-dependent call of a piecewise-linear op in the forward pass
contributes one code per output unit: ReLU, LeakyReLU, abs: pre-activation > 0; hardtanh /
ReLU6 / clamp: how many of its thresholds the input exceeds (0, 1 or 2); max pooling: which
entry of its window wins (ties go to the first, as torch breaks them). The ops are found by
intercepting torch functions (`TorchFunctionMode`), so `nn.ReLU`, `F.relu` inside a residual
block and `nn.MaxPool2d` are all seen, whatever the model's structure. A call whose input does
not depend on the network input (e.g. DAM's gate, a function of parameters only) is constant
and ignored. On the set of inputs that share a pattern every op is affine, so the network is
affine there and that set is convex (an intersection of half-spaces, one per unit, by induction
over the calls); the number of distinct patterns is the number of *activation regions* (Hanin &
Rolnick 2019), an upper bound on the number of linear pieces (neighbouring regions may share one
affine map). A network that also applies a smooth input-dependent nonlinearity (sigmoid, tanh,
exp, log, softmax inside the network, a product of two input-dependent tensors) is not piecewise
linear: its activation regions are still counted but are not linear pieces, and no bound is
stated. A network with no piecewise-linear op at all (a sigmoid LeNet, a linear classifier) is
"not applicable".

**Estimators** (lower estimates of the regions met; both seeded, settings in `RegionSettings`):

1. lines: the segment between two data points, sampled at `line_points` evenly spaced points;
   neighbours whose patterns differ in more than one unit are bisected up to `refine_depth`
   times within `max_evaluations` new points (a generic line crosses one boundary at a time;
   see `line_crossings` for what an unresolved interval counts). Regions met = crossings + 1.
   Beside it, the exact number of first-group crossings (the first op's pre-activations are
   affine along the line, so each unit's breakpoint is solved for): a sampled count below it
   means the sampling missed regions, and the report flags it.
2. planes: through three data points p0, p1, p2, the parallelogram p0 + u (p1 − p0) + v (p2 − p0),
   u, v in [0, `plane_extent`], on a `plane_grid` x `plane_grid` grid (extent 1 spans the three
   points; a smaller one is a patch at p0 that a coarse grid can resolve); regions met = unique
   patterns (each
   region is convex, so one pattern is one connected piece of the plane).

**Upper bounds** (worst case over weights, for the input dimension d; the plane's and the line's
are the same bounds at d = 2 and d = 1, since a network restricted to an affine plane is a
network on R^2):

* product bound: ∏_g Σ_{j=0}^{d} C(h_g, j) over the piecewise-linear calls g in forward order,
  h_g the hyperplanes call g adds (units for ReLU-like ops, two per unit for two-threshold ops,
  C(k, 2) per max-pool output over a window of k). Within one region of the earlier calls every
  unit of call g is affine in the input, so call g's h_g hyperplanes cut that region into at most
  Σ_{j≤d} C(h_g, j) cells (Zaslavsky); this is the arrangement argument of Montúfar, Pascanu, Cho
  & Bengio (NeurIPS 2014) and Raghu et al. (ICML 2017, Thm 1), in the form of the seed paper's
  notes. It holds for residual blocks too (they only add affine skip paths between calls).
* Serra, Tjandraatmadja & Ramalingam (ICML 2018, Thm 1), for a plain chain of affine layers and
  ReLUs: Σ_{(j_1..j_L) ∈ J} ∏_l C(n_l, j_l), J = {0 ≤ j_l ≤ min(d, n_1 − j_1, ..., n_{l−1} −
  j_{l−1}, n_l)}; tighter because a region's image loses a dimension per inactive unit.

For convolutional layers the "width" n_l is the number of units of the layer (channels x output
positions): a convolution is an affine map and each output unit one hyperplane in input space.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from models.base import load_federated_state

# op name (torch function __name__) -> kind of code it contributes
_RELU_LIKE = frozenset({"relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "abs", "abs_"})
_THRESHOLDS = frozenset({"hardtanh", "hardtanh_", "relu6", "clamp", "clamp_", "clip", "clip_"})
_MAX_POOLS = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3}
# Smooth nonlinearities: applied to an input-dependent tensor they make the map not piecewise linear.
_SMOOTH = frozenset(
    {
        "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "log_", "log1p", "softmax",
        "log_softmax", "gelu", "silu", "elu", "selu", "celu", "softplus", "mish", "erf", "sqrt",
        "rsqrt", "reciprocal", "pow", "normalize", "cosine_similarity", "layer_norm", "group_norm",
        "instance_norm", "logsigmoid", "softsign", "tanhshrink", "hardsigmoid", "hardswish",
    }
)  # fmt: skip
# Bilinear ops: nonlinear when two of their tensor arguments depend on the input.
_PRODUCTS = frozenset(
    {"mul", "mul_", "__mul__", "__rmul__", "matmul", "bmm", "mm", "einsum", "div", "__truediv__"}
)
_POOL_SIGNATURE = inspect.signature(F.max_pool2d_with_indices)
_HARDTANH_SIGNATURE = inspect.signature(F.hardtanh)
_CHAIN_MODULES = (
    nn.Flatten, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.Identity, nn.Dropout,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, nn.Unflatten,
)  # fmt: skip

SERRA = "Serra, Tjandraatmadja & Ramalingam, ICML 2018, Thm 1 (chain of affine layers and ReLUs)"
PRODUCT = (
    "arrangement product bound prod_g sum_{j<=d} C(h_g, j) (Montufar et al. 2014; Raghu et al. 2017, Thm 1)"
)
NOT_APPLICABLE = "not applicable: no piecewise-linear activation"
EXACT_LIMIT = 10**15  # exact integers above this are given as log10 only
CODE = torch.int16
# A max-pool code is the winner's flat input index modulo this prime: two entries of one window
# never collide while the window spans fewer flat positions (inputs up to 16,000 wide).
POOL_MODULUS = 32749
CODE_BUDGET = 2**24  # codes held at once (32 MiB of int16): bounds the rows per forward chunk


@dataclass(frozen=True)
class RegionSettings:
    """How densely the estimators sample; every count is seeded by `seed`."""

    lines: int = 6
    line_points: int = 256
    refine_depth: int = 12
    max_evaluations: int = 1024  # new points per segment for the bisection
    planes: int = 2
    plane_grid: int = 48
    plane_extent: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        extent = self.plane_extent
        if isinstance(extent, bool) or not isinstance(extent, (int, float)) or not 0 < extent < math.inf:
            raise ValueError(f"plane_extent must be a number > 0, got {extent!r}; pass e.g. plane_extent=1")
        for name, low in (
            ("lines", 0),
            ("line_points", 2),
            ("refine_depth", 0),
            ("max_evaluations", 0),
            ("planes", 0),
            ("plane_grid", 2),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"{name} must be an integer >= {low}, got {value!r}; pass e.g. {name}={low + 2}"
                )


@dataclass(frozen=True)
class PiecewiseCall:
    """One input-dependent piecewise-linear call of the forward pass."""

    op: str
    units: int  # codes per sample
    hyperplanes: int  # per sample: what it adds to the arrangement


class _Recorder(TorchFunctionMode):
    """Records each input-dependent piecewise-linear call's codes, and which smooth ops touch the
    input. Input dependence is `requires_grad` with the parameters frozen and the input not."""

    def __init__(self) -> None:
        super().__init__()
        self.codes: list[Tensor] = []
        self.calls: list[PiecewiseCall] = []
        self.smooth: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = args[0] if args else kwargs.get("input")
        if isinstance(first, Tensor) and first.requires_grad:
            if name in _RELU_LIKE or name in _THRESHOLDS or name in _MAX_POOLS:
                self._record(name, first, args, kwargs)
            elif name in _SMOOTH:
                self.smooth.add(name)
        if name in _PRODUCTS:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.requires_grad]
            if len(tensors) >= 2:
                self.smooth.add(name)
        return func(*args, **kwargs)

    def _record(self, name: str, x: Tensor, args: tuple, kwargs: dict) -> None:
        x = x.detach()  # codes are computed before the call: an in-place op overwrites its input
        batch = x.shape[0]
        if name in _RELU_LIKE:
            code = (x > 0).reshape(batch, -1).to(CODE)
            per_unit = 1
        elif name in _MAX_POOLS:
            bound = _POOL_SIGNATURE.bind(*args, **kwargs).arguments
            pool = getattr(F, f"{name}_with_indices")
            kernel = bound["kernel_size"]
            window = math.prod(kernel) if isinstance(kernel, Sequence) else kernel ** _MAX_POOLS[name]
            options = {k: bound[k] for k in ("stride", "padding", "dilation", "ceil_mode") if k in bound}
            index = pool(x, kernel, **options, return_indices=True)[1].reshape(batch, -1)
            code = (index % POOL_MODULUS).to(CODE)
            per_unit = math.comb(window, 2)
        else:
            low, high = _thresholds(name, args, kwargs)
            code = sum((x > t).to(CODE) for t in (low, high) if t is not None)
            code = torch.as_tensor(code).reshape(batch, -1)
            per_unit = sum(t is not None for t in (low, high))
        self.codes.append(code)
        self.calls.append(PiecewiseCall(name.rstrip("_"), code.shape[1], per_unit * code.shape[1]))


def _thresholds(name: str, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    if name.startswith("relu6"):
        return 0.0, 6.0
    if name.startswith("hardtanh"):
        bound = _HARDTANH_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments["min_val"], bound.arguments["max_val"]
    rest = [*args[1:], None, None]
    return kwargs.get("min", rest[0]), kwargs.get("max", rest[1])


class PatternProbe:
    """Activation patterns of a frozen, eval-mode copy of `model` at points of its (embedded)
    input space; `patterns(x)` returns one int16 row of codes per point."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.forward = getattr(self.model, "forward_embedded", self.model)
        self.calls: list[PiecewiseCall] = []
        self.smooth: tuple[str, ...] = ()
        self.chunk = 256  # points per forward pass; set from the unit count after the first one

    def pool_columns(self) -> Tensor:
        """Which code columns are max-pool winners (the rest are unit signs or thresholds)."""
        parts = [torch.full((c.units,), c.op.startswith("max_pool")) for c in self.calls]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def patterns(self, points: Tensor) -> Tensor:
        rows = []
        step = self.chunk
        for start in range(0, len(points), step):
            recorder = _Recorder()
            x = points[start : start + step].detach().clone().requires_grad_(True)
            with recorder:
                self.forward(x)
            self.calls, self.smooth = recorder.calls, tuple(sorted(recorder.smooth))
            self.chunk = max(16, CODE_BUDGET // max(1, sum(c.units for c in self.calls)))
            codes = recorder.codes or [torch.zeros(len(x), 0, dtype=CODE)]
            rows.append(torch.cat(codes, dim=1))
        return torch.cat(rows)

    def first_preactivation(self, points: Tensor) -> Tensor | None:
        """The first call's input per point (batch, units) if that call is ReLU-like (its
        breakpoints along a line are then one root per unit), else None."""
        recorder = _FirstInput()
        with recorder:
            self.forward(points.detach().clone().requires_grad_(True))
        return recorder.value


class _FirstInput(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.value: Tensor | None = None
        self.seen = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = args[0] if args else kwargs.get("input")
        piecewise = name in _RELU_LIKE or name in _THRESHOLDS or name in _MAX_POOLS
        if piecewise and not self.seen and isinstance(first, Tensor) and first.requires_grad:
            self.seen = True
            if name in _RELU_LIKE:
                self.value = first.detach().reshape(first.shape[0], -1).clone()
        return func(*args, **kwargs)


# --- estimators ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineCount:
    """Boundary crossings found on one segment; `unresolved` intervals were still changing in
    several units when the evaluation budget ran out (counted by their changed units)."""

    crossings: int
    evaluations: int
    unresolved: int


def line_crossings(
    probe: PatternProbe,
    start: Tensor,
    end: Tensor,
    points: int = 256,
    refine_depth: int = 12,
    max_evaluations: int = 1024,
) -> LineCount:
    """Boundary crossings on the segment start -> end, from `points` evenly spaced samples.

    An interval whose end patterns differ in one unit holds one crossing. One whose patterns
    differ in several is bisected (a generic line crosses one boundary at a time), at most
    `refine_depth` times and `max_evaluations` new points in all; at the depth limit it counts
    as one crossing (units flipping together, e.g. a ReLU turning on and winning its pooling
    window), and where the budget ran out as the number of its units other than max-pool
    winners that differ (each flipped an odd number of times, so at least once). A lower
    estimate: a region entered and left within one interval is missed."""
    ts = torch.linspace(0, 1, points, dtype=torch.float64)
    codes = probe.patterns(_on_line(start, end, ts))
    signs = ~probe.pool_columns()
    lo_t, hi_t, lo_c, hi_c = ts[:-1], ts[1:], codes[:-1], codes[1:]
    crossings = evaluations = unresolved = 0
    cap = max(1, CODE_BUDGET // max(1, codes.shape[1]))  # new rows held at once
    for depth in range(refine_depth + 1):
        changed = (lo_c != hi_c).sum(dim=1)
        crossings += int((changed == 1).sum())
        several = (changed > 1).nonzero().flatten()
        if depth == refine_depth:
            crossings += len(several)
            break
        room = max(0, min(max_evaluations - evaluations, cap))
        rest, several = several[room:], several[:room]
        if len(rest):
            crossings += int((lo_c[rest][:, signs] != hi_c[rest][:, signs]).sum(dim=1).clamp(min=1).sum())
            unresolved += len(rest)
        if not len(several):
            break
        mids = (lo_t[several] + hi_t[several]) / 2
        mid_c = probe.patterns(_on_line(start, end, mids))
        evaluations += len(several)
        lo_t, hi_t = torch.cat([lo_t[several], mids]), torch.cat([mids, hi_t[several]])
        lo_c, hi_c = torch.cat([lo_c[several], mid_c]), torch.cat([mid_c, hi_c[several]])
    return LineCount(crossings, points + evaluations, unresolved)


def first_group_crossings(probe: PatternProbe, start: Tensor, end: Tensor) -> int | None:
    """Exact crossings of the first piecewise-linear call's boundaries on the open segment (its
    pre-activations are affine along the line: z(t) = z(0) + t (z(1) − z(0)), one root per unit);
    distinct roots, as coinciding hyperplanes cross together. None unless that call is ReLU-like."""
    z = probe.first_preactivation(torch.stack([start, end]))
    if z is None:
        return None
    z0, z1 = z[0].double(), z[1].double()
    moving = (z1 - z0).abs() > 1e-12
    roots = -z0[moving] / (z1 - z0)[moving]
    inside = roots[(roots > 0) & (roots < 1)]
    return len(np.unique(np.round(inside.numpy(), 9)))


def plane_regions(
    probe: PatternProbe, p0: Tensor, p1: Tensor, p2: Tensor, grid: int = 48, extent: float = 1.0
) -> int:
    """Unique activation patterns on a grid x grid lattice of p0 + u (p1 − p0) + v (p2 − p0),
    u, v in [0, extent] (ends included)."""
    us = torch.linspace(0, extent, grid, dtype=p0.dtype)
    u, v = torch.meshgrid(us, us, indexing="ij")
    shape = (-1,) + (1,) * p0.dim()
    points = p0 + u.reshape(shape) * (p1 - p0) + v.reshape(shape) * (p2 - p0)
    return unique_patterns(probe, points)


def unique_patterns(probe: PatternProbe, points: Tensor) -> int:
    """How many distinct activation patterns the points have."""
    seen: set[bytes] = set()
    probe.patterns(points[:1])  # sets the chunk size
    for start in range(0, len(points), probe.chunk):
        codes = probe.patterns(points[start : start + probe.chunk]).numpy()
        seen.update(row.tobytes() for row in np.ascontiguousarray(codes))
    return len(seen)


def _on_line(start: Tensor, end: Tensor, ts: Tensor) -> Tensor:
    return start + ts.to(start.dtype).reshape((-1,) + (1,) * start.dim()) * (end - start)


# --- bounds --------------------------------------------------------------------------------------


def product_bound(hyperplanes: Sequence[int], dim: int) -> int:
    """∏_g Σ_{j=0}^{dim} C(h_g, j): the arrangement bound for calls adding h_g hyperplanes each."""
    total = 1
    for h in hyperplanes:
        total *= sum(math.comb(h, j) for j in range(min(dim, h) + 1))
    return total


def serra_bound(widths: Sequence[int], dim: int) -> int:
    """Serra et al. (2018) Thm 1 for a chain of ReLU layers of `widths` on inputs of dimension
    `dim`: Σ over J of ∏_l C(n_l, j_l), J = {0 <= j_l <= min(dim, n_1 − j_1, ..., n_{l−1} −
    j_{l−1}, n_l)}; summed by dynamic programming over the running minimum."""
    states = {dim: 1}  # running minimum -> sum of products so far
    for width in widths:
        following: dict[int, int] = {}
        for bound, count in states.items():
            for j in range(min(bound, width) + 1):
                key = min(bound, width - j)
                following[key] = following.get(key, 0) + count * math.comb(width, j)
        states = following
    return sum(states.values())


@dataclass(frozen=True)
class RegionBound:
    """An upper bound on the regions of the whole input space (d = input dimension), of a plane
    (d = 2) and of a line (d = 1); exact integers where below `EXACT_LIMIT`, else log10."""

    name: str
    input_dim: int
    log10_input: float
    plane: int | None
    log10_plane: float
    line: int | None
    log10_line: float


def region_bound(calls: Sequence[PiecewiseCall], input_dim: int, chain: bool) -> RegionBound:
    """The tightest of the bounds that apply: Serra's for a chain of ReLUs, else the product.
    Exact integers for the plane and the line; log10 for the input space (its integers have
    thousands of digits for an image)."""
    if chain and all(c.op == "relu" for c in calls):
        name, widths = SERRA, [c.units for c in calls]
        exact, log10 = serra_bound, serra_log10
    else:
        name, widths = PRODUCT, [c.hyperplanes for c in calls]
        exact, log10 = product_bound, product_log10
    plane, line = exact(widths, 2), exact(widths, 1)
    return RegionBound(
        name=name,
        input_dim=input_dim,
        log10_input=log10(widths, input_dim),
        plane=plane if plane <= EXACT_LIMIT else None,
        log10_plane=math.log10(plane),
        line=line if line <= EXACT_LIMIT else None,
        log10_line=math.log10(line),
    )


_LN10 = math.log(10)


def _log_comb(n: int, upto: int) -> np.ndarray:
    """ln C(n, j) for j = 0 .. upto (upto <= n)."""
    j = torch.arange(upto + 1, dtype=torch.float64)
    return (math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)).numpy()


def product_log10(hyperplanes: Sequence[int], dim: int) -> float:
    """log10 of `product_bound`, in floating point."""
    return sum(float(np.logaddexp.reduce(_log_comb(h, min(dim, h)))) for h in hyperplanes) / _LN10


def serra_log10(widths: Sequence[int], dim: int) -> float:
    """log10 of `serra_bound` in O(dim) per layer: the new running minimum s comes either from
    m = s with j <= min(s, n - s), or from any m >= max(s + 1, n - s) with j = n - s."""
    weights = np.full(dim + 1, -np.inf)
    weights[dim] = 0.0  # ln 1 at the running minimum d
    for n in widths:
        top = min(n, len(weights) - 1)
        log_c = _log_comb(n, n)
        prefix = np.logaddexp.accumulate(log_c)  # ln sum_{j<=k} C(n, j)
        # ln sum_{m>=k} W[m], with a -inf past the end
        suffix = np.append(np.logaddexp.accumulate(weights[::-1])[::-1], -np.inf)
        s = np.arange(top + 1)
        stay = weights[s] + prefix[np.minimum(s, n - s)]
        first = np.maximum(s + 1, n - s)
        drop = log_c[n - s] + suffix[np.minimum(first, len(weights))]
        weights = np.logaddexp(stay, drop)
    return float(np.logaddexp.reduce(weights)) / _LN10


# --- the report ------------------------------------------------------------------------------------


@dataclass
class LinearRegions:
    """Measured regions near the data and the bound; `applicable` False with a note when the
    network has no piecewise-linear activation."""

    model: str
    applicable: bool
    note: str
    piecewise_linear: bool = False
    smooth_ops: tuple[str, ...] = ()
    ops: dict[str, int] = field(default_factory=dict)  # op -> units
    units: int = 0
    line_regions: list[int] = field(default_factory=list)
    line_first_group_crossings: list[int | None] = field(default_factory=list)
    line_unresolved: list[int] = field(default_factory=list)  # intervals left when the budget ran out
    plane_regions: list[int] = field(default_factory=list)
    bound: RegionBound | None = None
    settings: RegionSettings = field(default_factory=RegionSettings)
    seconds: float = 0.0

    @property
    def mean_line_regions(self) -> float | None:
        return float(np.mean(self.line_regions)) if self.line_regions else None

    @property
    def mean_plane_regions(self) -> float | None:
        return float(np.mean(self.plane_regions)) if self.plane_regions else None

    @property
    def sampling_missed(self) -> int:
        """Lines whose sampled crossings fall short of the exact first-group crossings."""
        return sum(
            exact is not None and measured - 1 < exact
            for measured, exact in zip(self.line_regions, self.line_first_group_crossings, strict=True)
        )

    @property
    def planes_saturated(self) -> int:
        """Planes where at least half the grid points have a pattern of their own: the grid, not
        the network, limits the count there (raise `plane_grid`)."""
        return sum(2 * count >= self.settings.plane_grid**2 for count in self.plane_regions)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            mean_line_regions=self.mean_line_regions,
            mean_plane_regions=self.mean_plane_regions,
            sampling_missed=self.sampling_missed,
            planes_saturated=self.planes_saturated,
        )
        return out

    def line(self) -> str:
        """One line for the audit's printout."""
        if not self.applicable:
            return f"linear regions: {self.note}"
        s = self.settings
        parts = []
        if self.line_regions:
            missed = f", {self.sampling_missed} undersampled" if self.sampling_missed else ""
            cut = sum(n > 0 for n in self.line_unresolved)
            missed += f", {cut} hit the {s.max_evaluations}-point budget" if cut else ""
            parts.append(
                f"{self.mean_line_regions:.1f} per segment between data points "
                f"(max {max(self.line_regions)}, {len(self.line_regions)} segments x {s.line_points} "
                f"points, bisected {s.refine_depth}x{missed})"
            )
        if self.plane_regions:
            saturated = f", {self.planes_saturated} grid-limited" if self.planes_saturated else ""
            parts.append(
                f"{self.mean_plane_regions:.1f} per plane through 3 data points "
                f"(max {max(self.plane_regions)}, {len(self.plane_regions)} planes, "
                f"{s.plane_grid}x{s.plane_grid} grid{_extent(s.plane_extent)}{saturated})"
            )
        measured = "; ".join(parts) or "no measurement"
        ops = ", ".join(f"{units} {op}" for op, units in self.ops.items())
        head = f"linear regions ({ops} units)"
        if self.bound is None:
            return f"{head}: {measured}; {self.note}"
        b = self.bound
        return (
            f"{head}: {measured}; upper bound {_fmt_bound(b.line, b.log10_line)} per line, "
            f"{_fmt_bound(b.plane, b.log10_plane)} per plane, {_fmt_bound(None, b.log10_input)} in "
            f"R^{b.input_dim} [{b.name}]{'; ' + self.note if self.note else ''}"
        )


def _extent(extent: float) -> str:
    return "" if extent == 1 else f" over {extent:g} of the span"


def _fmt_bound(exact: int | None, log10: float) -> str:
    return f"{exact:,}" if exact is not None else f"10^{log10:.1f}"


def linear_regions(
    model: nn.Module, data: Tensor, settings: RegionSettings | None = None, name: str | None = None
) -> LinearRegions:
    """Regions of `model` met on segments and planes through the samples `data` (N, *shape):
    `settings.lines` random pairs and `settings.planes` random triples of them (seeded)."""
    start = time.perf_counter()
    settings = settings or RegionSettings()
    label = name or str(getattr(model, "name", type(model).__name__))
    probe = PatternProbe(model)
    embed = getattr(probe.model, "embed", None)
    with torch.no_grad():
        points = (embed(data) if embed is not None else data).detach().float()
    probe.patterns(points[:2])
    if not probe.calls:
        return LinearRegions(
            label, False, NOT_APPLICABLE, settings=settings, seconds=time.perf_counter() - start
        )
    ops: dict[str, int] = {}
    for call in probe.calls:
        ops[call.op] = ops.get(call.op, 0) + call.units
    result = LinearRegions(
        label,
        True,
        "",
        piecewise_linear=not probe.smooth,
        smooth_ops=probe.smooth,
        ops=ops,
        units=sum(ops.values()),
        settings=settings,
    )
    rng = np.random.default_rng(settings.seed)
    for i, j in _choose(rng, len(points), 2, settings.lines):
        count = line_crossings(
            probe, points[i], points[j], settings.line_points, settings.refine_depth, settings.max_evaluations
        )
        result.line_regions.append(count.crossings + 1)
        result.line_unresolved.append(count.unresolved)
        result.line_first_group_crossings.append(first_group_crossings(probe, points[i], points[j]))
    for i, j, k in _choose(rng, len(points), 3, settings.planes):
        result.plane_regions.append(
            plane_regions(probe, points[i], points[j], points[k], settings.plane_grid, settings.plane_extent)
        )
    notes = []
    if len(points) < 3:
        notes.append(f"only {len(points)} data points: lines need 2, planes 3")
    if probe.smooth:
        notes.append(
            f"not piecewise linear ({', '.join(probe.smooth)} on the input's path): counts are activation "
            "regions of its piecewise-linear units, not linear pieces; no bound"
        )
    else:
        chain = _is_chain(probe.model, points[:2])
        result.bound = region_bound(probe.calls, int(points[0].numel()), chain)
    result.note = "; ".join(notes)
    result.seconds = time.perf_counter() - start
    return result


def _choose(rng: np.random.Generator, n: int, size: int, count: int) -> list[tuple[int, ...]]:
    """`count` distinct `size`-subsets of range(n), seeded (all of them if there are fewer)."""
    subsets = list(itertools.combinations(range(n), size))
    if len(subsets) <= count:
        return subsets
    return [subsets[i] for i in sorted(rng.choice(len(subsets), size=count, replace=False))]


def _is_chain(model: nn.Module, probe_points: Tensor) -> bool:
    """Whether `model` is a Sequential (itself, or its `layers`) of affine layers and ReLUs only
    (checked on the points: the forward is the Sequential's), as Serra et al.'s bound needs."""
    layers = model if isinstance(model, nn.Sequential) else getattr(model, "layers", None)
    if not isinstance(layers, nn.Sequential) or not all(isinstance(m, _CHAIN_MODULES) for m in layers):
        return False
    with torch.no_grad():
        return bool(torch.equal(model(probe_points), layers(probe_points)))


def regions_over_rounds(
    model: nn.Module,
    states: Iterable[tuple[int, Mapping[str, Tensor]]],
    data: Tensor,
    settings: RegionSettings | None = None,
) -> list[dict[str, Any]]:
    """The region counts of `model` loaded with each (round, federated state: a checkpoint), on
    the same data points, segments and planes every round: one row per round."""
    rows = []
    for server_round, state in states:
        load_federated_state(model, {k: v.float() for k, v in state.items()})
        report = linear_regions(model, data, settings)
        rows.append(
            {
                "round": server_round,
                "mean_line_regions": report.mean_line_regions,
                "max_line_regions": max(report.line_regions, default=None),
                "mean_plane_regions": report.mean_plane_regions,
                "max_plane_regions": max(report.plane_regions, default=None),
                "line_regions": report.line_regions,
                "plane_regions": report.plane_regions,
                "sampling_missed": report.sampling_missed,
                "seconds": report.seconds,
            }
        )
    return rows
