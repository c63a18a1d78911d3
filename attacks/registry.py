"""Attacks by name, each with a one-line description and what it works on, and settings sized
for auditing every update of a federation.

Reference iteration counts (DLG 300 L-BFGS steps, Inverting Gradients 24,000 Adam steps) are
the classes' defaults; an auditor that runs per client per round uses fewer, and says so in
each Reconstruction's diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from attacks.analytic.closed_form import AnalyticFCInversion
from attacks.auto import AutoAttack
from attacks.base import Attack
from attacks.layerwise import LayerwiseInversion
from attacks.optimisation.gradient_matching import DLG, IDLG, InvertingGradients
from attacks.text.dager_llama import DagerLlamaAttack
from attacks.text.token_leakage import DagerAttack, TokenSetAttack


@dataclass(frozen=True)
class AttackEntry:
    """One registered attack: how to build it and what `fedsim attacks` says about it."""

    build: Callable[[], Attack]
    description: str
    works_on: str


ATTACKS: dict[str, AttackEntry] = {
    "auto": AttackEntry(
        AutoAttack,
        "Layer-wise inversion where its systems cover the network, else Inverting Gradients; says why.",
        "any differentiable model and batch size (the choice and its reason are in the row's note)",
    ),
    "layerwise": AttackEntry(
        LayerwiseInversion,
        "R-GAP/COPA layer-wise inversion: solves each layer's linear system from the output down.",
        "batch-1 gradients of Linear/Conv2d nets with invertible activations and a biased head",
    ),
    "layerwise-hybrid": AttackEntry(
        lambda: LayerwiseInversion(hybrid=True),
        "Layer-wise inversion plus COPA's gradient-matching refinement of rank-deficient layers.",
        "what layerwise works on; helps where a layer's system is rank-deficient (cnn6-d)",
    ),
    "analytic-fc": AttackEntry(
        AnalyticFCInversion,
        "Closed form: the input of a leading Linear layer is its weight gradient over its bias gradient.",
        "models that start with Flatten + Linear with bias (mlp); exact for batch 1",
    ),
    "dlg": AttackEntry(
        lambda: DLG(iterations=100),
        "Deep Leakage from Gradients: L-BFGS fits dummy inputs and a soft label (100 steps).",
        "any twice-differentiable model and batch size; best on smooth (sigmoid, tanh) nets",
    ),
    "idlg": AttackEntry(
        lambda: IDLG(iterations=100),
        "iDLG: DLG with the label read off the head's gradient (100 steps).",
        "what dlg works on, with a softmax head of one row per class",
    ),
    "inverting-gradients": AttackEntry(
        lambda: InvertingGradients(iterations=1000),
        "Inverting Gradients: cosine gradient distance + TV prior, signed Adam (1,000 steps).",
        "any twice-differentiable model and batch size; images in [0, 1]",
    ),
    "token-set": AttackEntry(
        TokenSetAttack,
        "The exact set of tokens in the batch: the rows of the embedding gradient that are non-zero.",
        "token models with a trainable nn.Embedding (positions and counts are not revealed)",
    ),
    "dager": AttackEntry(
        DagerAttack,
        "DAGER: tokens whose first-projection input lies in the span of its weight gradient, per position.",
        "token models with a per-token Linear after the embedding and B·L < its width; order needs positions",
    ),
    "dager-llm": AttackEntry(
        DagerLlamaAttack,
        "DAGER on a Llama-style causal LM: the vocabulary through the first block's q/k/v span, "
        "then sequences grown token by token through the second block's.",
        "transformers decoders (smollm2) whose first two blocks' q/k/v weights train; B·L < the width",
    ),
}


def available_attacks() -> list[str]:
    return sorted(ATTACKS)


def build_attack(name: str) -> Attack:
    """The named attack; KeyError lists the choices."""
    entry = ATTACKS.get(name)
    if entry is None:
        raise KeyError(f"unknown attack {name!r}; choose one of: {', '.join(available_attacks())}")
    return entry.build()
