"""Score an attack's reconstruction against the samples the client really trained on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attacks.base import Reconstruction
from audits.image_metrics import mse, reported_psnr, ssim


@dataclass(frozen=True)
class LeakageScore:
    """Mean PSNR / SSIM over reconstructed images (each paired with its closest true sample)."""

    psnr: float
    ssim: float
    label_correct: bool | None
    matched: np.ndarray  # index of the true sample each reconstruction was paired with


def score_reconstruction(
    reconstruction: Reconstruction, truth_inputs: np.ndarray, truth_labels: np.ndarray, binary_labels: bool
) -> LeakageScore:
    """Pair each reconstructed image with the true sample nearest in MSE (an attacker's output
    has no order, and for multi-sample updates may resemble any of them), then score the pairs.

    `binary_labels`: a single-logit head only leaks the label's parity, so compare that.
    """
    rec = reconstruction.inputs.detach().float().clamp(0, 1).cpu().numpy()
    truth = np.asarray(truth_inputs, dtype=np.float32)
    if rec.shape[1:] != truth.shape[1:]:
        raise ValueError(f"reconstruction shape {rec.shape[1:]} differs from the samples' {truth.shape[1:]}")
    distances = np.stack([mse(np.repeat(r[None], len(truth), 0), truth) for r in rec])
    matched = distances.argmin(axis=1)
    paired = truth[matched]
    label_correct = None
    if reconstruction.labels is not None:
        wanted = np.asarray(truth_labels)[matched]
        if binary_labels:
            wanted = wanted % 2
        got = torch.as_tensor(reconstruction.labels).reshape(-1).cpu().numpy()[: len(wanted)]
        label_correct = bool(np.array_equal(got, wanted[: len(got)]))
    return LeakageScore(
        psnr=float(np.mean(reported_psnr(paired, rec))),
        ssim=float(np.mean(ssim(paired, rec))),
        label_correct=label_correct,
        matched=matched,
    )
