"""Inverting LEDL's sufficient statistics: the samples behind one client's XCᵀ, CCᵀ, YCᵀ.

A LEDL client (`models.ledl`) sends E = XCᵀ (d×K), CCᵀ (K×K) and YCᵀ (c×K), sums over its
samples. Row c of YCᵀ is the sum of the codes of its class-c samples, so where a class holds one
sample of the client, that row is the sample's code exactly; with the codes Ĉ (one column per
class present) the attacker solves E = X̂Ĉᵀ by least squares, X̂ = E·pinv(Ĉᵀ). One sample per
class (one sample in all, in particular) is recovered to rounding; several samples of a class
come back as one image that mixes them (their code-weighted combination).
"""

from __future__ import annotations

import numpy as np


def invert_statistics(xct: np.ndarray, yct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(X̂ (d×m), classes (m,)): one recovered sample per class present in YCᵀ (a non-zero row)."""
    present = np.flatnonzero(np.abs(yct).sum(axis=1) > 0)
    codes = yct[present].T  # K×m: the class-c row is Σ codes of its class-c samples
    return xct @ np.linalg.pinv(codes.T), present
