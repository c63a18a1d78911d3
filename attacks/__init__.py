"""Attacks on observed client updates: one interface (`Attack`), one module per mechanism."""

from attacks.base import Attack, AttackError, ObservedUpdate, Reconstruction, observe_gradient

__all__ = ["Attack", "AttackError", "ObservedUpdate", "Reconstruction", "observe_gradient"]
