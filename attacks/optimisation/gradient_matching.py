"""Optimisation-based gradient inversion: DLG, iDLG and Inverting Gradients.

All three fit dummy inputs whose gradient matches the observed one. They differ in the loss,
the label handling and the optimiser:
- DLG (Zhu et al. 2019): squared gradient distance, L-BFGS, dummy label learnt as softmax(logits);
- iDLG (Zhao et al. 2020): DLG with the label read off the last layer's gradient, kept fixed;
- Inverting Gradients (Geiping et al. 2020): 1 − cosine similarity + total variation, Adam on
  signed gradients, step learning-rate schedule, pixels boxed to the data range [0, 1].
Each attack is deterministic under its `seed`; defaults follow the papers / breaching configs.
The gradient of the dummy batch is taken with `create_graph=True`, so these attacks work with
any twice-differentiable ZooModel (sigmoid/tanh nets; ReLU nets give piecewise-zero curvature).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from attacks.analytic.closed_form import recover_labels_idlg
from attacks.base import AttackError, ObservedUpdate, Reconstruction
from models.base import ZooModel

INITS = ("randn", "rand")


@dataclass
class _Target:
    """The observed gradient, aligned with the parameters it was taken for."""

    params: list[torch.nn.Parameter]
    grads: list[torch.Tensor]


def _target(update: ObservedUpdate) -> _Target:
    spec = getattr(update.model, "spec", None)
    if spec is not None and spec.modality == "tokens":
        raise AttackError(
            "it optimises a continuous dummy input, and token ids are discrete (the end-to-end "
            "analysis differentiates at the model's embedded input instead)"
        )
    named = [(n, p) for n, p in update.model.named_parameters() if p.requires_grad]
    if not named:
        raise AttackError("the model has no trainable parameters, so its update carries no gradient")
    params = [p for _, p in named]
    grads = [update.gradients[n].detach().to(dtype=p.dtype) for n, p in named]
    return _Target(params, grads)


def _initial_inputs(update: ObservedUpdate, seed: int, init: str) -> torch.Tensor:
    """The deterministic starting dummy batch (B, *input_shape)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    generator = torch.Generator().manual_seed(seed)
    shape = (update.batch_size, *update.input_shape)
    sampler = torch.randn if init == "randn" else torch.rand
    return sampler(shape, generator=generator, dtype=torch.float32)


def _fixed_labels(update: ObservedUpdate) -> torch.Tensor:
    """Known labels if the threat model grants them, else iDLG's guess."""
    labels = update.known_labels if update.known_labels is not None else recover_labels_idlg(update)
    labels = labels.detach().to(torch.int64).reshape(-1)
    if len(labels) != update.batch_size:
        raise AttackError(f"{len(labels)} labels for a batch of {update.batch_size}")
    return labels


def _dummy_gradients(target: _Target, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The dummy batch's gradient; 0 for parameters the loss does not reach (a branch used only in
    training, e.g. a contrastive projection head), whose observed entries then add a constant."""
    return torch.autograd.grad(loss, target.params, create_graph=True, materialize_grads=True)


def _output_width(model: ZooModel, inputs: torch.Tensor) -> int:
    """Number of logits the head produces (1 for a logistic head)."""
    with torch.no_grad():
        return int(model(inputs[:1]).shape[-1])


def _soft_label_loss(outputs: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
    """The client's loss with a soft label, as DLG optimises it.

    Single-logit (logistic) heads get BCE against sigmoid(logit); all others get cross-entropy
    against softmax(logits). Models whose `loss` is not CE/logistic need known labels (use IDLG).
    """
    if outputs.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(outputs.squeeze(-1), torch.sigmoid(label_logits[:, 0]))
    return F.cross_entropy(outputs, torch.softmax(label_logits, dim=-1))


def squared_distance(dummy: tuple[torch.Tensor, ...], observed: list[torch.Tensor]) -> torch.Tensor:
    """DLG's objective: Σ over layers of ‖∇θ(dummy) − ∇θ(observed)‖²."""
    return sum(((d - o) ** 2).sum() for d, o in zip(dummy, observed, strict=True))  # type: ignore[return-value]


def cosine_distance(dummy: tuple[torch.Tensor, ...], observed: list[torch.Tensor]) -> torch.Tensor:
    """Geiping et al.'s objective: 1 − cosine of the gradients, dot products and norms summed over layers."""
    dot = sum((d * o).sum() for d, o in zip(dummy, observed, strict=True))
    dummy_norm = sum(d.pow(2).sum() for d in dummy).sqrt()  # type: ignore[union-attr]
    observed_norm = math.sqrt(float(sum(o.pow(2).sum() for o in observed)))
    return 1.0 - dot / (dummy_norm * observed_norm + 1e-12)  # type: ignore[return-value]


def total_variation(inputs: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV (mean |Δx| + mean |Δy|) for image batches; zero for non-image inputs."""
    if inputs.dim() != 4:
        return inputs.new_zeros(())
    dx = (inputs[:, :, :, 1:] - inputs[:, :, :, :-1]).abs().mean()
    dy = (inputs[:, :, 1:, :] - inputs[:, :, :-1, :]).abs().mean()
    return dx + dy


class _Best:
    """Keeps the lowest-loss iterate, so a diverging run (L-BFGS can blow up) still returns its best."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.loss = math.inf
        self.inputs = inputs.detach().clone()
        self.extra: torch.Tensor | None = None

    def offer(self, loss: float, inputs: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        if math.isfinite(loss) and loss < self.loss:
            self.loss = loss
            self.inputs = inputs.detach().clone()
            self.extra = None if extra is None else extra.detach().clone()


@dataclass
class DLG:
    """Deep Leakage from Gradients: L-BFGS on dummy data and a learnt soft label.

    `iterations` counts L-BFGS `step` calls as in mit-han-lab/dlg (300), each of which runs up to
    `inner_iterations` (torch's default 20) quasi-Newton iterations. Defaults: lr 1, Gaussian init,
    no line search (the paper's; it occasionally diverges, `line_search="strong_wolfe"` is more
    robust). DLG always learns the label, so `known_labels` are ignored (IDLG uses them). The soft
    label enters a cross-entropy (BCE for a single-logit head), the loss DLG assumes the client uses.
    """

    name: ClassVar[str] = "dlg"

    iterations: int = 300
    lr: float = 1.0
    inner_iterations: int = 20
    history_size: int = 100
    line_search: str | None = None
    init: str = "randn"
    seed: int = 0
    tolerance: float = 0.0

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    def initial_inputs(self, update: ObservedUpdate) -> torch.Tensor:
        """The starting dummy batch, clamped to [0, 1] so it can be scored as a baseline image."""
        return _initial_inputs(update, self.seed, self.init).clamp(0.0, 1.0)

    def _label_logits(self, update: ObservedUpdate, width: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn((update.batch_size, width), generator=generator)

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        start = time.perf_counter()
        target = _target(update)
        model = update.model
        inputs = _initial_inputs(update, self.seed, self.init)
        width = _output_width(model, inputs)
        inputs.requires_grad_(True)
        logits = self._label_logits(update, width).requires_grad_(True)

        def objective() -> torch.Tensor:
            loss = _soft_label_loss(model(inputs), logits)
            return squared_distance(_dummy_gradients(target, loss), target.grads)

        best, stats = self._optimise(objective, [inputs, logits], inputs, logits)
        learnt = best.extra if best.extra is not None else logits.detach()
        # Single-logit heads train on label parity, so only the parity bit is recoverable.
        labels = learnt.argmax(dim=-1) if width > 1 else learnt[:, 0].gt(0).long()
        return self._result(best, labels, stats, start)

    def _optimise(
        self,
        objective: Any,
        variables: list[torch.Tensor],
        inputs: torch.Tensor,
        extra: torch.Tensor | None,
    ) -> tuple[_Best, dict[str, Any]]:
        """Run L-BFGS; stop early on a non-finite loss, a stalled step or loss <= tolerance."""
        optimizer = torch.optim.LBFGS(
            variables,
            lr=self.lr,
            max_iter=self.inner_iterations,
            history_size=self.history_size,
            line_search_fn=self.line_search,
        )
        best = _Best(inputs)
        evaluations = 0

        def closure() -> torch.Tensor:
            nonlocal evaluations
            evaluations += 1
            optimizer.zero_grad(set_to_none=True)
            loss = objective()
            grads = torch.autograd.grad(loss, variables)
            for variable, grad in zip(variables, grads, strict=True):
                variable.grad = grad
            best.offer(float(loss.detach()), inputs, extra)
            return loss.detach()

        steps, previous, stop, loss = 0, math.inf, "iterations", math.inf
        while steps < self.iterations:
            steps += 1
            loss = float(optimizer.step(closure))
            if not math.isfinite(loss):
                stop = "non-finite loss"
                break
            if best.loss <= self.tolerance:
                stop = "tolerance"
                break
            if loss == previous:
                stop = "stalled"
                break
            previous = loss
        stats = {"final_loss": loss, "iterations_run": steps, "function_evaluations": evaluations}
        return best, {**stats, "stopped_by": stop}

    def _result(
        self, best: _Best, labels: torch.Tensor, stats: dict[str, Any], start: float
    ) -> Reconstruction:
        diagnostics = {"best_loss": best.loss, **stats, "settings": self.settings()}
        inputs = best.inputs.clamp(0.0, 1.0)
        return Reconstruction(inputs, labels.detach().clone(), time.perf_counter() - start, diagnostics)


@dataclass
class IDLG(DLG):
    """iDLG: DLG with the label fixed to the one the last layer's gradient gives away."""

    name: ClassVar[str] = "idlg"

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        start = time.perf_counter()
        target = _target(update)
        labels = _fixed_labels(update)
        inputs = _initial_inputs(update, self.seed, self.init).requires_grad_(True)
        model = update.model

        def objective() -> torch.Tensor:
            loss = model.loss(model(inputs), labels)
            return squared_distance(_dummy_gradients(target, loss), target.grads)

        best, stats = self._optimise(objective, [inputs], inputs, None)
        return self._result(best, labels, stats, start)


@dataclass
class InvertingGradients:
    """Geiping et al. 2020: cosine gradient distance + TV prior, signed Adam, boxed to [0, 1].

    Defaults follow breaching's `invertinggradients.yaml` (24,000 iterations, lr 0.1, signed
    gradients, learning rate ×0.1 at 3/8, 5/8 and 7/8 of the run, Gaussian init) except the TV
    weight: breaching's 0.2 applies to normalised images; on [0, 1] pixels 0.01 (COPA's Geiping
    baseline) works better (sigmoid LeNet, 32×32 crop: 23.6 dB vs 19.9 dB with 0.2). The label
    is known or recovered with iDLG, as in the paper. The lowest-loss iterate is returned.
    """

    name: ClassVar[str] = "inverting-gradients"

    iterations: int = 24_000
    lr: float = 0.1
    tv_weight: float = 0.01
    signed: bool = True
    boxed: bool = True
    schedule: bool = True
    init: str = "randn"
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        return asdict(self)

    def initial_inputs(self, update: ObservedUpdate) -> torch.Tensor:
        """The starting dummy batch as the attack sees it after boxing to [0, 1]."""
        return _initial_inputs(update, self.seed, self.init).clamp(0.0, 1.0)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        if not self.schedule:
            return None
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        start = time.perf_counter()
        target = _target(update)
        labels = _fixed_labels(update)
        inputs = _initial_inputs(update, self.seed, self.init)
        if self.boxed:
            inputs.clamp_(0.0, 1.0)
        inputs.requires_grad_(True)
        optimizer = torch.optim.Adam([inputs], lr=self.lr)
        scheduler = self._scheduler(optimizer)
        best, loss, steps = _Best(inputs), math.inf, 0
        while steps < self.iterations:
            steps += 1
            loss = self._step(update.model, target, inputs, labels, optimizer, best)
            if scheduler is not None:
                scheduler.step()
            if not math.isfinite(loss):
                break
        diagnostics = {
            "final_loss": loss,
            "best_loss": best.loss,
            "iterations_run": steps,
            "settings": self.settings(),
        }
        inputs_out = best.inputs.clamp(0.0, 1.0)
        return Reconstruction(inputs_out, labels.clone(), time.perf_counter() - start, diagnostics)

    def _step(
        self,
        model: ZooModel,
        target: _Target,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        best: _Best,
    ) -> float:
        """One Adam step on the (optionally signed) gradient, then project back into the box."""
        loss = model.loss(model(inputs), labels)
        objective = cosine_distance(_dummy_gradients(target, loss), target.grads)
        if self.tv_weight:
            objective = objective + self.tv_weight * total_variation(inputs)
        value = float(objective.detach())
        best.offer(value, inputs)
        (grad,) = torch.autograd.grad(objective, [inputs])
        inputs.grad = grad.sign() if self.signed else grad
        optimizer.step()
        if self.boxed:
            with torch.no_grad():
                inputs.clamp_(0.0, 1.0)
        return value
