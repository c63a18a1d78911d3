"""Score an attack's reconstruction against the samples the client really trained on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audits.similarity.image import label_overlap, mse, reported_psnr, ssim


@dataclass(frozen=True)
class LeakageScore:
    """Mean PSNR / SSIM over reconstructed images (each paired with its closest true sample)."""

    psnr: float
    ssim: float
    label_score: float | None
    matched: np.ndarray  # index of the true sample each reconstruction was paired with
    pair_psnr: np.ndarray  # PSNR of each reconstruction against its paired sample

    @property
    def best_match(self) -> int:
        """The true sample the attack came closest to (what an audit grid shows)."""
        return int(self.matched[int(np.argmax(self.pair_psnr))])


def score_reconstruction(
    images: np.ndarray,
    recovered_labels: np.ndarray | None,
    truth_inputs: np.ndarray,
    truth_targets: np.ndarray,
) -> LeakageScore:
    """Pair each reconstructed image with the true sample nearest in MSE (an attacker's output
    has no order, and for multi-sample updates may resemble any of them), then score the pairs.

    `truth_targets` are the true labels as the model trains on them (`ZooModel.targets`: e.g.
    only the parity for a single-logit head), which is what an attack can recover.
    """
    rec = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    truth = np.asarray(truth_inputs, dtype=np.float32)
    if rec.shape[1:] != truth.shape[1:]:
        raise ValueError(f"reconstruction shape {rec.shape[1:]} differs from the samples' {truth.shape[1:]}")
    distances = np.stack([mse(np.repeat(r[None], len(truth), 0), truth) for r in rec])
    matched = distances.argmin(axis=1)
    paired = truth[matched]
    pair_psnr = reported_psnr(paired, rec)
    return LeakageScore(
        psnr=float(np.mean(pair_psnr)),
        ssim=float(np.mean(ssim(paired, rec))),
        label_score=label_score(truth_targets, recovered_labels),
        matched=matched,
        pair_psnr=pair_psnr,
    )


def label_score(true_targets: np.ndarray, recovered: np.ndarray | None) -> float | None:
    """Share of recovered labels that match a distinct true label (a multiset overlap).

    Label rules such as iDLG's recover which classes a batch holds, not which sample carries
    which, so for batch > 1 an exact match of the whole list would read 0 although most labels
    leaked. None when the attack recovers no labels.
    """
    if recovered is None or np.asarray(recovered).size == 0:
        return None
    return label_overlap(true_targets, recovered) / int(np.asarray(recovered).size)
