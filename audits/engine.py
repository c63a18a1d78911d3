"""The audit engine: attacks on one observed update, scored against the true samples."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attacks.base import AttackError, ObservedUpdate, Reconstruction
from attacks.registry import build_attack
from audits.leakage import score_reconstruction


@dataclass
class AttackOutcome:
    """One attack on one update: the scores, or why it could not run."""

    attack: str
    reconstruction: Reconstruction | None
    psnr: float | None
    ssim: float | None
    label_correct: bool | None
    seconds: float
    note: str = ""
    matched: int = 0  # the true sample the (first) reconstructed image was paired with


class UpdateAuditor:
    """Runs named attacks on an observed update and scores them against the true samples."""

    def __init__(self, attack_names: Sequence[str]) -> None:
        self.attacks = [build_attack(name) for name in attack_names]

    def audit(self, update: ObservedUpdate, truth_x: np.ndarray, truth_y: np.ndarray) -> list[AttackOutcome]:
        threads = torch.get_num_threads()
        # The attacks' small graphs gain nothing from a second thread and slow down up to 50x
        # when another process (a Ray client) holds the other core.
        torch.set_num_threads(1)
        try:
            return self._run_attacks(update, truth_x, truth_y)
        finally:
            torch.set_num_threads(threads)

    def _run_attacks(
        self, update: ObservedUpdate, truth_x: np.ndarray, truth_y: np.ndarray
    ) -> list[AttackOutcome]:
        binary = getattr(update.model, "head", "ce") == "logistic"
        outcomes = []
        for attack in self.attacks:
            start = time.perf_counter()
            try:
                rec = attack.reconstruct(update)
            except AttackError as err:
                elapsed = time.perf_counter() - start
                outcomes.append(AttackOutcome(attack.name, None, None, None, None, elapsed, note=str(err)))
                continue
            score = score_reconstruction(rec, truth_x, truth_y, binary)
            outcomes.append(
                AttackOutcome(
                    attack.name,
                    rec,
                    score.psnr,
                    score.ssim,
                    score.label_correct,
                    rec.seconds,
                    matched=int(score.matched[0]),
                )
            )
        return outcomes


def threat_model(batch_size: int, local_steps: int) -> str:
    if local_steps == 1:
        return f"fedsgd-b{batch_size}" + (
            " (dw/lr: one gradient)" if batch_size == 1 else " (dw/lr: batch-mean gradient)"
        )
    return f"fedavg-b{batch_size}-s{local_steps} (gradient estimated as dw/(lr*steps))"
