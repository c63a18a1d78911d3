"""Hybrid supervised-contrastive network for long-tailed data (Wang et al., CVPR 2021).

One backbone feeds two branches: a projection head whose L2-normalised embedding is trained
with supervised contrastive loss (SC, Khosla et al. 2020) or prototypical SC (PSC: one learnable
normalised prototype per class), and a linear classifier trained with cross-entropy on a
class-balanced batch. The local objective is α·L_SC/PSC + (1 − α)·L_CE with the parabolic decay
α = 1 − (T/T_max)², T the global round (1 … rounds), so the last round is pure CE; only the
classifier branch is used at inference (`forward`), so evaluation and the audits see a CE
classifier.

Sampling follows the paper's two samplers inside one client step (the `training_loss` hook): the
contrastive branch sees two augmented views of the instance-balanced batch the loop drew, and the
CE branch an equally large class-balanced batch drawn from the client's whole training split
(each sample with probability ∝ 1 / its class's count there, so every class the client holds is
equally likely), which `before_local_training` makes available for the round. Called without
that hook (e.g. directly), the CE batch is a class-balanced resample of the loop's batch. All
inputs (two views, the CE batch) go through the network in one forward pass. Augmentations
(shift by zero-padding and cropping, horizontal flip, Gaussian noise) and the class-balanced
draws come from torch's global RNG, which the client loop seeds per client and round, so runs
repeat exactly. The CE batch's samples are not among the loop's `seen` samples (the auditor's
ground truth), and a per-sample DP wrapper would treat the 3·B inputs of a step as 3·B samples;
contrastive losses couple samples anyway, so DP-SGD's per-sample accounting does not apply.

No BatchNorm: FedAvg averages every tensor and there are no running statistics to decide about.
The PSC prototypes are plain parameters averaged by FedAvg and re-normalised in use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from models.base import InputSpec, TrainingSettings, ZooModel

PROJECTION_HIDDEN = 128


def contrast_weight(server_round: int, rounds: int) -> float:
    """α = 1 − (T/T_max)² on the global round clock (T = round 1 … rounds): from near 1 in the
    first round to 0 in the last, so the classifier finishes on CE alone."""
    progress = min(max(server_round, 0), rounds) / max(rounds, 1)
    return 1.0 - progress**2


def supervised_contrastive_loss(embeddings: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Khosla et al.'s L_SC over L2-normalised `embeddings` (N, D): for anchor i with positives
    P(i) = {p ≠ i : y_p = y_i}, −1/|P(i)| Σ_p log(exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ)),
    averaged over the anchors that have a positive; anchors without one are skipped (0 if none
    has one, still connected to the graph)."""
    count = len(labels)
    similarity = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(count, dtype=torch.bool, device=embeddings.device)
    # log-softmax over a ≠ i: the anchor itself is excluded from its denominator.
    log_prob = similarity.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    positive_count = positives.sum(dim=1)
    has_positive = positive_count > 0
    if not bool(has_positive.any()):
        return embeddings.sum() * 0.0
    per_anchor = (
        -log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has_positive] / positive_count[has_positive]
    )
    return per_anchor.mean()


def prototypical_contrastive_loss(
    embeddings: Tensor, labels: Tensor, prototypes: Tensor, temperature: float
) -> Tensor:
    """L_PSC with one normalised prototype per class: −log(exp(z_i·p_{y_i}/τ) / Σ_j exp(z_i·p_j/τ)),
    the usual stable form (the positive prototype is in the denominator), averaged over anchors.
    Every anchor has its class's prototype as positive, so none is skipped."""
    logits = embeddings @ F.normalize(prototypes, dim=1).T / temperature
    return F.cross_entropy(logits, labels)


def augment(images: Tensor, shift: int, noise: float) -> Tensor:
    """One random view per image (N, C, H, W): shift by up to `shift` pixels (zero-pad, then crop
    back at a random offset), flip horizontally with probability 1/2, add N(0, noise²) and clip to
    [0, 1]. Drawn from torch's global RNG (seeded by the client loop)."""
    count, _, height, width = images.shape
    if shift > 0:
        padded = F.pad(images, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (count,))
        dx = torch.randint(0, 2 * shift + 1, (count,))
        rows = (dy[:, None] + torch.arange(height))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx[:, None] + torch.arange(width))[:, None, None, :]  # (N, 1, 1, W)
        batch = torch.arange(count)[:, None, None, None]
        channel = torch.arange(images.shape[1])[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    flip = torch.rand(count) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if noise > 0:
        images = images + noise * torch.randn_like(images)
    return images.clamp(0.0, 1.0)


def class_balanced_indices(labels: Tensor, count: int) -> Tensor:
    """`count` indices into `labels`, drawn with replacement so that every class present is
    equally likely: sample i has probability ∝ 1 / (count of its class in `labels`)."""
    counts = torch.bincount(labels)
    weights = 1.0 / counts[labels].double()
    return torch.multinomial(weights, count, replacement=True)


class HybridContrastive(ZooModel):
    """Small convnet backbone (three 3×3 conv + ReLU + 2×2 max-pool blocks), a linear classifier
    (the inference path) and a 2-layer projection head to a normalised embedding; PSC adds one
    learnable prototype per class. `ce_only` trains the same network by plain CE on one augmented
    view of the instance-balanced batch: the baseline the hybrid is compared with."""

    per_sample_loss = False  # the contrastive term compares each sample with the rest of its batch

    def __init__(
        self,
        spec: InputSpec,
        contrast: str,
        width: int,
        proj_dim: int,
        temperature: float,
        balanced_ce: bool,
        ce_only: bool,
        shift: int,
        noise: float,
    ) -> None:
        super().__init__(spec)
        self.contrast = contrast
        self.temperature = temperature
        self.balanced_ce = balanced_ce
        self.ce_only = ce_only
        self.shift = shift
        self.noise = noise
        channels, height, width_px = spec.shape
        blocks: list[nn.Module] = []
        for out_channels in (width, 2 * width, 4 * width):
            blocks += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, height, width_px = out_channels, height // 2, width_px // 2
        blocks.append(nn.Flatten())
        self.backbone = nn.Sequential(*blocks)
        features = channels * height * width_px
        self.projection = nn.Sequential(
            nn.Linear(features, PROJECTION_HIDDEN), nn.ReLU(), nn.Linear(PROJECTION_HIDDEN, proj_dim)
        )
        # Registered last: label recovery (iDLG) takes a branched model's last nn.Linear as its output.
        self.classifier = nn.Linear(features, spec.num_classes)
        self.prototypes = (
            nn.Parameter(F.normalize(torch.randn(spec.num_classes, proj_dim), dim=1))
            if contrast == "psc"
            else None
        )
        # α of the current round; set by `configure_optimizer` at each round's start.
        self.alpha = 0.0 if ce_only else 1.0
        # The client's training split during a round, for the CE branch's class-balanced batch.
        self.balanced_pool: tuple[Tensor, Tensor] | None = None

    def forward(self, inputs: Tensor, branches: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Class logits (the inference path); with `branches`, (logits, normalised embedding).
        The keyword passes through per-sample wrappers, which forward their arguments."""
        features = self.backbone(inputs)
        logits = self.classifier(features)
        if not branches:
            return logits
        return logits, F.normalize(self.projection(features), dim=1)

    def configure_optimizer(self, settings: TrainingSettings, server_round: int) -> torch.optim.Optimizer:
        """Sets this round's α on the global round clock, then the default SGD."""
        self.alpha = 0.0 if self.ce_only else contrast_weight(server_round, settings.rounds)
        return super().configure_optimizer(settings, server_round)

    def before_local_training(self, data_loader: DataLoader, server_round: int) -> None:
        """Keeps the client's training split for this round's class-balanced CE batches."""
        inputs, labels = data_loader.dataset.tensors[:2]  # type: ignore[attr-defined]
        self.balanced_pool = (inputs, self.targets(labels))

    def after_local_training(self, data_loader: DataLoader, server_round: int) -> None:
        self.balanced_pool = None

    def ce_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The CE branch's batch, as large as the loop's: class-balanced from the client's split
        (or, without it, from the batch), or the batch itself when `balanced_ce` is off."""
        if not self.balanced_ce:
            return inputs, targets
        pool_inputs, pool_targets = self.balanced_pool or (inputs, targets)
        chosen = class_balanced_indices(pool_targets, len(targets))
        return pool_inputs[chosen], pool_targets[chosen]

    def contrastive_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.prototypes is not None:
            return prototypical_contrastive_loss(embeddings, labels, self.prototypes, self.temperature)
        return supervised_contrastive_loss(embeddings, labels, self.temperature)

    def training_loss(self, module: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        """α·L_SC/PSC(two views of the batch) + (1 − α)·L_CE(class-balanced batch), in one
        forward pass; a branch whose weight is 0 is not computed."""
        if self.ce_only:
            return F.cross_entropy(module(augment(inputs, self.shift, self.noise)), targets)
        count = len(targets)
        parts: list[Tensor] = []
        if self.alpha > 0:
            parts += [augment(inputs, self.shift, self.noise), augment(inputs, self.shift, self.noise)]
        ce_targets = targets
        if self.alpha < 1:
            ce_inputs, ce_targets = self.ce_batch(inputs, targets)
            parts.append(augment(ce_inputs, self.shift, self.noise))
        logits, embeddings = module(torch.cat(parts), branches=True)
        loss = logits.new_zeros(())
        if self.alpha > 0:
            views_labels = torch.cat([targets, targets])
            loss = loss + self.alpha * self.contrastive_loss(embeddings[: 2 * count], views_labels)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * F.cross_entropy(logits[-count:], ce_targets)
        return loss


def _hybrid(
    spec: InputSpec,
    contrast: str,
    width: int,
    proj_dim: int,
    temperature: float,
    balanced_ce: bool,
    ce_only: bool,
    shift: int,
    noise: float,
) -> HybridContrastive:
    if min(spec.shape[1:]) < 8:
        raise ValueError(
            f"hybrid-{contrast} pools three times and needs images of at least 8×8, got {spec.shape}"
        )
    if width < 1:
        raise ValueError(f"width must be at least 1 (got {width}); pass e.g. width=16")
    if proj_dim < 2:
        raise ValueError(f"proj_dim must be at least 2 (got {proj_dim}); pass e.g. proj_dim=64")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); pass e.g. temperature=0.1")
    if shift < 0:
        raise ValueError(f"shift must be >= 0 (got {shift}); pass 0 for no shifts, e.g. shift=2")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0 (got {noise}); pass 0 for no noise, e.g. noise=0.05")
    return HybridContrastive(spec, contrast, width, proj_dim, temperature, balanced_ce, ce_only, shift, noise)


def hybrid_sc(
    spec: InputSpec,
    width: int = 16,
    proj_dim: int = 64,
    temperature: float = 0.1,
    balanced_ce: bool = True,
    ce_only: bool = False,
    shift: int = 2,
    noise: float = 0.05,
) -> HybridContrastive:
    """Hybrid network with the supervised contrastive branch (τ = 0.1 as in the paper)."""
    return _hybrid(spec, "sc", width, proj_dim, temperature, balanced_ce, ce_only, shift, noise)


def hybrid_psc(
    spec: InputSpec,
    width: int = 16,
    proj_dim: int = 64,
    temperature: float = 1.0,
    balanced_ce: bool = True,
    ce_only: bool = False,
    shift: int = 2,
    noise: float = 0.05,
) -> HybridContrastive:
    """Hybrid network with the prototypical SC branch (τ = 1.0, the paper's CIFAR-10 setting)."""
    return _hybrid(spec, "psc", width, proj_dim, temperature, balanced_ce, ce_only, shift, noise)
