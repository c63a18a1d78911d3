"""`auto`: the strongest attack that applies to the observed update, and why it was chosen.

An auditor facing a zoo of architectures should not have to know which attack each one admits.
The layer-wise inversion is exact where its systems cover the network (a batch-1 gradient of a
flat chain the network plan treats); elsewhere (prototype layers, gates, residual blocks, batches)
it declines with a reason, and an optimisation attack, which needs only a differentiable model,
runs instead. The reconstruction's diagnostics carry the choice and the reason (`CHOICE_KEY`),
which the audit rows show as a note.
"""

from __future__ import annotations

import time

from attacks.base import Attack, AttackError, ObservedUpdate, Reconstruction
from attacks.layerwise import LayerwiseInversion
from attacks.optimisation.gradient_matching import InvertingGradients

CHOICE_KEY = "attack_choice"


class AutoAttack:
    """Layer-wise inversion where it applies, otherwise `fallback` (Inverting Gradients)."""

    name = "auto"

    def __init__(self, layerwise: Attack | None = None, fallback: Attack | None = None) -> None:
        self.layerwise = layerwise or LayerwiseInversion()
        self.fallback = fallback or InvertingGradients(iterations=1000)

    def reconstruct(self, update: ObservedUpdate) -> Reconstruction:
        start = time.perf_counter()
        try:
            rec = self.layerwise.reconstruct(update)
        except AttackError as declined:
            reason = str(declined)
        else:
            rec.diagnostics[CHOICE_KEY] = f"auto chose {self.layerwise.name}: its systems cover the network"
            return rec
        try:
            rec = self.fallback.reconstruct(update)
        except AttackError as err:
            raise AttackError(
                f"{self.layerwise.name} declined ({reason}); {self.fallback.name}: {err}"
            ) from None
        rec.diagnostics[CHOICE_KEY] = (
            f"auto chose {self.fallback.name}: {self.layerwise.name} declined ({reason})"
        )
        rec.seconds = time.perf_counter() - start
        return rec
