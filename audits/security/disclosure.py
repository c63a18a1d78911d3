"""What a family's protocol reveals to the server beside its weight updates, stated and measured.

The gradient attacks judge the update; some families send more. ProtoPNet's push round sends, per
prototype, one latent patch of a client's training image (`models.protopnet`); here that patch is
taken from the audited sample (as if it held the nearest patch) and inverted back to pixels
(`attacks.disclosure.latent_patch`), and the receptive-field window's PSNR is reported. A family with another
side channel adds its statement here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from attacks.disclosure.latent_patch import invert_latent_patch
from attacks.disclosure.statistics import invert_statistics
from audits.similarity.image import reported_psnr
from models.base import ZooModel
from models.ledl import Ledl
from models.protopnet import ProtoPNet, push_candidates

# Inversions per audit (prototypes of the sample's class) and Adam steps each: about 1.5 s apiece.
PUSH_PROBES = 3
PUSH_ITERATIONS = 300


@dataclass(frozen=True)
class Disclosure:
    """One side channel: what it sends, and (where measured) how much of the input it gives back."""

    channel: str
    statement: str
    psnr: float | None = None  # mean over the probes
    baseline_psnr: float | None = None  # a constant grey guess, for scale
    window: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        measured = ""
        if self.psnr is not None and self.channel == STATISTICS_CHANNEL:
            measured = (
                f" Measured: a client holding only the audited sample sends statistics from which it is "
                f"recovered at {self.psnr:.1f} dB PSNR (a grey guess: {self.baseline_psnr:.1f} dB)."
            )
        elif self.psnr is not None:
            measured = (
                f" Measured: inverting the feature extractor on that latent (Adam, {PUSH_ITERATIONS} steps, "
                f"position known) recovers the {self.window} receptive-field window of the audited sample "
                f"at {self.psnr:.1f} dB PSNR (a grey guess: {self.baseline_psnr:.1f} dB)."
            )
        return f"{self.channel}: {self.statement}{measured}"


def disclosures(model: ZooModel, inputs: torch.Tensor, labels: torch.Tensor) -> list[Disclosure]:
    """The side channels of `model`'s protocol, measured at the first sample of `inputs`."""
    if isinstance(model, ProtoPNet):
        return [push_disclosure(model, inputs[:1], labels[:1])]
    if isinstance(model, Ledl):
        return [statistics_disclosure(model, inputs[:1], labels[:1])]
    return []


STATISTICS_CHANNEL = "dictionary statistics"


def statistics_disclosure(model: Ledl, inputs: torch.Tensor, labels: torch.Tensor) -> Disclosure:
    """LEDL's statistics of a client holding the one audited sample, inverted
    (`attacks.disclosure.statistics`): YCᵀ's non-zero row is the sample's code, E = XCᵀ = x·cᵀ."""
    atoms, dim = model.B.shape[1], model.B.shape[0]
    statement = (
        f"every round each client sends CCᵀ ({atoms}x{atoms}), XCᵀ ({dim}x{atoms}) and YCᵀ "
        f"({model.spec.num_classes}x{atoms}), sums over its samples of their sparse codes' products; "
        "YCᵀ's row of a class is the sum of that class's codes, so a class with one sample on the client "
        "hands over that sample's code and XCᵀ then gives the sample itself (least squares)."
    )
    with torch.no_grad():
        stats = model.statistics(inputs, labels)
    recovered, _ = invert_statistics(stats.xct.numpy(), stats.yct.numpy())
    truth = inputs[:1].double().numpy()
    guess = recovered[:, 0].reshape(truth.shape)
    grey = np.full_like(truth, 0.5)
    if model.spec.value_range != (0.0, 1.0):  # PSNR here assumes peak 1: report the statement only
        return Disclosure(STATISTICS_CHANNEL, statement)
    return Disclosure(
        STATISTICS_CHANNEL,
        statement,
        psnr=float(reported_psnr(truth, np.clip(guess, 0, 1))[0]),
        baseline_psnr=float(reported_psnr(truth, grey)[0]),
        window=f"{dim}-value",
    )


def push_disclosure(model: ProtoPNet, inputs: torch.Tensor, labels: torch.Tensor) -> Disclosure:
    dim = model.prototype_vectors.shape[1]
    statement = (
        f"in the push round every client sends, per prototype, the nearest latent patch ({dim} numbers, "
        "the add-on's output at one position) of one of its training images of the prototype's class, "
        "and its distance; the server writes the globally nearest into the model, so that patch of a "
        "client image becomes part of the global model."
    )
    candidates = push_candidates(model, inputs, labels)
    probes = np.flatnonzero(candidates.found)[:PUSH_PROBES]
    if len(probes) == 0:
        return Disclosure("prototype push", statement)
    results = []
    with torch.random.fork_rng(devices=[]):
        for j in probes:
            results.append(
                invert_latent_patch(
                    model,
                    torch.from_numpy(candidates.patches[j]),
                    int(candidates.row[j]),
                    int(candidates.col[j]),
                    inputs[0],
                    iterations=PUSH_ITERATIONS,
                )
            )
    height, width = results[0].truth.shape[1:]
    return Disclosure(
        "prototype push",
        statement,
        psnr=float(np.mean([r.psnr for r in results])),
        baseline_psnr=float(np.mean([r.baseline_psnr for r in results])),
        window=f"{height}x{width}",
    )
