"""Attacks by name, with settings sized for auditing every update of a federation.

Reference iteration counts (DLG 300 L-BFGS steps, Inverting Gradients 24,000 Adam steps) are
the classes' defaults; an auditor that runs per client per round uses fewer, and says so in
each Reconstruction's diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable

from attacks.analytic import AnalyticFCInversion
from attacks.base import Attack
from attacks.layerwise import LayerwiseInversion
from attacks.optimisation import DLG, IDLG, InvertingGradients

ATTACKS: dict[str, Callable[[], Attack]] = {
    "layerwise": LayerwiseInversion,
    "layerwise-hybrid": lambda: LayerwiseInversion(hybrid=True),
    "analytic-fc": AnalyticFCInversion,
    "dlg": lambda: DLG(iterations=100),
    "idlg": lambda: IDLG(iterations=100),
    "inverting-gradients": lambda: InvertingGradients(iterations=1000),
}


def available_attacks() -> list[str]:
    return sorted(ATTACKS)


def build_attack(name: str) -> Attack:
    """The named attack; KeyError lists the choices."""
    try:
        return ATTACKS[name]()
    except KeyError:
        raise KeyError(f"unknown attack {name!r}; choose one of: {', '.join(available_attacks())}") from None
