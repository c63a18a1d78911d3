"""One report per architecture: what the metrics predict, next to what the attacks achieved.

Three predictions, each honest about where it stops:

* the layer-wise metric (`audits.security.metric`): per-layer unknowns / rank / deficit, COPA's
  input-weighted score and E2EGI's count-based RA-i, for the layers layer-wise inversion treats;
  where it cannot treat one, the report says why and goes on;
* end-to-end identifiability (`audits.security.identifiability`) at one attacked sample: the rank deficit
  of d gradient / d input, for any differentiable model;
* the Cramér–Rao PSNR ceiling (`audits.security.leakage_bound`) at the noise the attacks faced: Gaussian
  noise of std σ on the exact gradient, or, for an exact gradient, noise of the power of the
  float32 rounding of a one-step weight delta at ROUNDING_LEARNING_RATE (the least noise a FedAvg
  server sees): uniform, at the RMS of its per-entry stds. The exact per-entry version (the
  whitened J, `leakage_bound` with `identifiability(noise_std=...)`) spans so many decades (the
  ulp of a weight near zero is tiny) that its Gram needs float64 products throughout, several
  times the cost; the uniform one shares the unwhitened J with the deficit.

Beside the security score, the linear regions a piecewise-linear network realises near the data
(`audits.security.linear_regions`: activation-pattern changes on segments between the audited samples,
unique patterns on planes through three of them) and the arrangement upper bound.

Beside them, each attack's PSNR on that sample and its mean over all samples. The ceiling holds
for unbiased attackers only; an attack with an image prior that beats it is flagged, not hidden.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from attacks.base import observe_gradient
from audits.scoring.engine import RECONSTRUCTED, AuditRow, SecurityMeasure, measure_security
from audits.security.disclosure import Disclosure, disclosures
from audits.security.identifiability import Identifiability, identifiability
from audits.security.leakage_bound import LeakageBound, leakage_bound, weight_delta_rounding_std
from audits.security.linear_regions import LinearRegions, RegionSettings, linear_regions
from audits.security.metric import SecurityReport
from models.base import ZooModel, model_label
from models.frozen_base import FrozenBaseModel

# The learning rate at which an exact-gradient audit states its bound: the float32 rounding of
# the weights after one SGD step, seen as a gradient, has std ulp(w) / sqrt(12) / lr.
ROUNDING_LEARNING_RATE = 0.1
# Torch threads for the end-to-end analysis, as the audit engine runs its attacks: on the 2-core
# dev machine with the other core busy, CNN6's Gram took 20-26 s on one thread and 51 s on two.
ANALYSIS_THREADS = 1
# Beyond this many parameters in the forward pass (trained or frozen: every product of J runs
# through all of them) the end-to-end analysis is not attempted. Its cheapest spectrum, the
# randomized one, takes (RANDOMIZED_RANK + OVERSAMPLE) x (1 + 2 POWER_STEPS) = 360 forward-over-
# reverse products; one batch-1 gradient of MiniLM (22.7 M) at 48 tokens takes ~0.3 s on a busy
# core and of SmolLM2 (134.5 M) at 32 tokens ~1 s, so an audit would spend minutes to hours
# (more for the Gram: D = 18,432 embedded inputs for both). The CNNs of the zoo stay far below.
MAX_END_TO_END_PARAMETERS = 5_000_000


@dataclass(frozen=True)
class ObservationNoise:
    """The noise on the gradient the attacks saw: Gaussian std `sigma` per coordinate added to
    the exact gradient; sigma = 0 means exact, and the bound is then stated at the float32
    rounding of a one-step weight delta at `rounding_learning_rate`."""

    sigma: float = 0.0
    rounding_learning_rate: float = ROUNDING_LEARNING_RATE

    def __post_init__(self) -> None:
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma}")
        if not self.rounding_learning_rate > 0:
            raise ValueError(f"rounding_learning_rate must be > 0, got {self.rounding_learning_rate}")

    @property
    def attacks_saw(self) -> str:
        return "the exact gradient" if self.sigma == 0 else f"the gradient + N(0, {self.sigma:g}^2) per entry"

    @property
    def bound_at(self) -> str:
        if self.sigma > 0:
            return f"Gaussian sigma = {self.sigma:g} per gradient entry"
        return (
            f"the power of float32 rounding of a one-step weight delta at lr {self.rounding_learning_rate:g} "
            "(uniform sigma = RMS of its per-entry stds)"
        )


@dataclass(frozen=True)
class AttackOutcome:
    """One attack's measured PSNR beside the ceiling: on the bound's sample and over all."""

    attack: str
    psnr: float | None  # on the sample the bound was computed at
    mean_psnr: float | None
    max_psnr: float | None
    reconstructed: int
    updates: int
    beats_ceiling: bool | None  # psnr > ceiling (possible only for a biased attacker); None when
    # the attacks saw the exact gradient, i.e. not the noise the ceiling assumes


@dataclass
class ArchitectureReport:
    """The layer-wise metric, the end-to-end rank and the PSNR ceiling of one model, with the
    attacks' measured PSNRs; a part that could not be computed is None and its note says why."""

    model: str
    input_shape: tuple[int, ...]
    noise: ObservationNoise
    layerwise: SecurityReport | None
    layerwise_note: str
    identifiability: Identifiability | None
    identifiability_note: str
    bound: LeakageBound | None
    bound_sample: int | None
    attacks: list[AttackOutcome] = field(default_factory=list)
    seconds: float = 0.0
    # What the family's protocol sends beside its updates (e.g. ProtoPNet's push), measured.
    disclosures: list[Disclosure] = field(default_factory=list)
    # Linear regions near the data (None with a note in `regions_note` if they failed).
    regions: LinearRegions | None = None
    regions_note: str = ""
    # For a frozen pretrained base: what its update carries and which attacks that admits.
    exposure: str = ""

    @property
    def score(self) -> int | None:
        return None if self.layerwise is None else self.layerwise.score

    @property
    def ra_index(self) -> int | None:
        return None if self.layerwise is None else self.layerwise.ra_index

    @property
    def end_to_end_deficit(self) -> int | None:
        return None if self.identifiability is None else self.identifiability.deficit

    @property
    def psnr_ceiling(self) -> float | None:
        return None if self.bound is None else self.bound.psnr_ceiling

    def to_dict(self) -> dict[str, Any]:
        ident = self.identifiability
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "noise": {
                **asdict(self.noise),
                "attacks_saw": self.noise.attacks_saw,
                "bound_at": self.noise.bound_at,
            },
            "layerwise": None if self.layerwise is None else self.layerwise.to_dict(),
            "layerwise_note": self.layerwise_note or None,
            "score": self.score,
            "ra_index": self.ra_index,
            "end_to_end": None if ident is None else ident.to_dict(),
            "end_to_end_note": self.identifiability_note or None,
            "end_to_end_deficit": self.end_to_end_deficit,
            "bound": None if self.bound is None else self.bound.to_dict(),
            "bound_sample": self.bound_sample,
            "psnr_ceiling": self.psnr_ceiling,
            "attacks": [asdict(a) for a in self.attacks],
            "disclosures": [d.to_dict() for d in self.disclosures],
            "linear_regions": None if self.regions is None else self.regions.to_dict(),
            "linear_regions_note": self.regions_note or None,
            "exposure": self.exposure or None,
            "seconds": self.seconds,
        }

    def to_table(self) -> str:
        """The layer-wise table (or why there is none), the end-to-end lines, and one line per
        attack with its PSNR beside the ceiling."""
        lines = [
            self.layerwise.to_table()
            if self.layerwise is not None
            else f"layer-wise metric: {self.layerwise_note}"
        ]
        lines.append(
            self.regions.line() if self.regions is not None else f"linear regions: {self.regions_note}"
        )
        lines.append(_end_to_end_line(self))
        if self.identifiability_note == NO_GRADIENT:  # no ceiling, no gradient attack to judge
            lines.append("gradient attacks: none apply (declined below); the side channels are what leaks")
        else:
            lines.append(_bound_line(self))
            if self.attacks:
                lines.append(_attack_table(self))
        if self.exposure:
            lines.append(f"what the update exposes: {self.exposure}")
        lines += [f"beside the update, {d.line()}" for d in self.disclosures]
        return "\n".join(lines)


NO_GRADIENT = "not applicable: the model is not trained by gradients, so no client sends one"


def architecture_report(
    model: ZooModel,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    noise: ObservationNoise | None = None,
    *,
    rows: Sequence[AuditRow] = (),
    bound_sample: int | None = None,
    security: SecurityMeasure | None = None,
    gradients: Mapping[str, torch.Tensor] | None = None,
    method: str = "auto",
    seed: int = 0,
    data: torch.Tensor | None = None,
    regions: RegionSettings | None = None,
) -> ArchitectureReport:
    """Predictions for `model` at the sample `inputs` (1, *shape) with dataset `labels` (1,), and
    the attacks' outcomes from `rows` (rows of `bound_sample` give the at-sample PSNR).

    security: the layer-wise metric if already computed (else computed here). gradients: the
    sample's exact gradient if already computed (the rounding noise of an exact-gradient audit
    is that of a step along it). data: the samples (N, *shape) the linear regions are counted
    between (default `inputs`); regions: their sampling settings (seeded by `seed` unless set).
    Nothing raises: a part that fails leaves a note."""
    start = time.perf_counter()
    noise = noise or ObservationNoise()
    shape = tuple(int(d) for d in inputs.shape[1:])
    security = security or measure_security(model, shape, seed=seed)
    ident, ident_note, bound = None, "", None
    forward_parameters = sum(p.numel() for p in model.parameters())
    if not model.trained_by_gradients:
        ident_note = NO_GRADIENT
    elif forward_parameters > MAX_END_TO_END_PARAMETERS:
        ident_note = too_large_note(model, forward_parameters, shape)
    else:
        try:
            ident, bound = _end_to_end(model, inputs, labels, noise, gradients, method, seed)
        except Exception as err:  # a report states what it could not compute, it does not raise
            ident_note = f"failed: {type(err).__name__}: {err}"
    report = ArchitectureReport(
        exposure=model.exposure() if isinstance(model, FrozenBaseModel) else "",
        model=model_label(model),
        input_shape=shape,
        noise=noise,
        layerwise=security.report,
        layerwise_note=security.note,
        identifiability=ident,
        identifiability_note=ident_note,
        bound=bound,
        bound_sample=bound_sample,
    )
    try:
        report.disclosures = disclosures(model, inputs, labels)
    except Exception as err:  # a report states what it could not compute, it does not raise
        report.disclosures = [
            Disclosure("side channels", f"could not be measured: {type(err).__name__}: {err}")
        ]
    try:
        settings = regions or RegionSettings(seed=seed)
        report.regions = linear_regions(model, inputs if data is None else data, settings)
    except Exception as err:  # a report states what it could not compute, it does not raise
        report.regions_note = f"failed: {type(err).__name__}: {err}"
    # The verdict compares like with like: only attacks that faced the bound's noise are judged.
    report.attacks = attack_outcomes(rows, bound_sample, report.psnr_ceiling if noise.sigma > 0 else None)
    report.seconds = time.perf_counter() - start
    return report


def too_large_note(model: ZooModel, parameters: int, shape: tuple[int, ...]) -> str:
    """Why the end-to-end analysis was skipped for a model of `parameters` (forward pass)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inputs = "embedded tokens" if model.spec.modality == "tokens" else "inputs"
    see = "; see what the update exposes" if isinstance(model, FrozenBaseModel) else ""
    return (
        f"not computed: every column of J is a forward-over-reverse pass through all "
        f"{parameters / 1e6:.1f} M parameters ({trained / 1e6:.2f} M trained) for {shape} {inputs}; "
        f"beyond {MAX_END_TO_END_PARAMETERS / 1e6:.0f} M that is minutes to hours per audit, so no rank "
        f"and no Cramer-Rao ceiling{see}"
    )


def _end_to_end(
    model: ZooModel,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    noise: ObservationNoise,
    gradients: Mapping[str, torch.Tensor] | None,
    method: str,
    seed: int,
) -> tuple[Identifiability, LeakageBound]:
    ident = identifiability(model, inputs, labels, method, seed=seed, threads=ANALYSIS_THREADS)
    sigma = noise.sigma
    if sigma == 0:
        if gradients is None:  # on a copy: a BatchNorm in training mode would update its statistics
            gradients = observe_gradient(copy.deepcopy(model), inputs, labels).gradients
        stds = weight_delta_rounding_std(model, gradients, noise.rounding_learning_rate)
        sigma = float(torch.cat([s.reshape(-1) for s in stds.values()]).square().mean().sqrt())
    return ident, leakage_bound(ident, sigma, noise.bound_at, _peak(model))


def _peak(model: ZooModel) -> float | None:
    """The width of the input's value range (PSNR's peak); None for embedded tokens or
    unbounded features."""
    value_range = model.spec.value_range
    if model.spec.modality == "tokens" or value_range is None:
        return None
    return float(value_range[1] - value_range[0])


def attack_outcomes(
    rows: Sequence[AuditRow], bound_sample: int | None, ceiling: float | None
) -> list[AttackOutcome]:
    """Per attack, in order of first appearance: PSNR on `bound_sample`, mean and max over all."""
    outcomes = []
    for attack in dict.fromkeys(r.attack for r in rows):
        mine = [r for r in rows if r.attack == attack]
        scored = [r.psnr for r in mine if r.status == RECONSTRUCTED and r.psnr is not None]
        at_sample = [r.psnr for r in mine if r.sample == bound_sample and r.psnr is not None]
        psnr = at_sample[0] if at_sample else None
        outcomes.append(
            AttackOutcome(
                attack=attack,
                psnr=psnr,
                mean_psnr=float(np.mean(scored)) if scored else None,
                max_psnr=max(scored) if scored else None,
                reconstructed=sum(r.status == RECONSTRUCTED for r in mine),
                updates=len(mine),
                beats_ceiling=None if psnr is None or ceiling is None else psnr > ceiling,
            )
        )
    return outcomes


def _end_to_end_line(report: ArchitectureReport) -> str:
    ident = report.identifiability
    if ident is None:
        return f"end-to-end identifiability: {report.identifiability_note}"
    where = f" at sample {report.bound_sample}" if report.bound_sample is not None else ""
    if ident.deficit is None:
        rank = f"rank not estimated, {ident.unseen_inputs} inputs unseen"
    else:
        rank = f"rank {ident.rank} of {ident.unknowns}, deficit {ident.deficit}"
    whitened = ", whitened by the noise" if ident.whitened else ""
    return (
        f"end-to-end J (d gradient / d input, {ident.parameters} x {ident.unknowns}{whitened}){where}: "
        f"{rank} [{ident.method}, {ident.seconds:.1f} s: {ident.cost}]"
    )


def _bound_line(report: ArchitectureReport) -> str:
    bound = report.bound
    saw = f"attacks saw {report.noise.attacks_saw}"
    if bound is None:
        return f"{saw}; no PSNR ceiling (end-to-end analysis unavailable)"
    ceiling = "none (zero floor)" if bound.psnr_ceiling is None else f"{bound.psnr_ceiling:.1f} dB"
    share = (
        ""
        if bound.unidentifiable is None
        else f"; {bound.unidentifiable} of {bound.unknowns} input directions unidentifiable "
        f"({bound.unidentifiable_fraction:.1%}), not counted in the floor"
    )
    kind = "" if bound.exact else " (lower estimate from a partial spectrum)"
    at = report.noise.bound_at if report.noise.sigma > 0 else f"{report.noise.bound_at} = {bound.sigma:.3g}"
    return (
        f"{saw}; Cramer-Rao at {at}: per-input MSE >= {bound.mse_floor:.3g}{kind}, "
        f"PSNR ceiling {ceiling} for unbiased attackers{share}"
    )


def _attack_table(report: ArchitectureReport) -> str:
    header = ("attack", "PSNR@sample", "mean PSNR", "max PSNR", "ceiling", "vs ceiling")
    ceiling = report.psnr_ceiling
    rows = []
    for outcome in report.attacks:
        verdict = {None: "-", True: "above (biased attacker)", False: "below"}[outcome.beats_ceiling]
        rows.append(
            (
                outcome.attack,
                _fmt(outcome.psnr),
                _fmt(outcome.mean_psnr),
                _fmt(outcome.max_psnr),
                _fmt(ceiling),
                verdict,
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if report.noise.sigma == 0:
        lines.append(
            "(the attacks saw the exact gradient, not the noise the ceiling assumes: no verdict; "
            "pass --gradient-noise to compare like with like)"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.1f}"
