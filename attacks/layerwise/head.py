"""The last layer of layer-wise inversion: recover the label, dL/dlogits (k) and the head's input.

Two heads are supported (they are what `models.classifiers` builds):

* cross-entropy head with bias: dL/db = softmax(l) - onehot(y), so the label is the only class
  with a negative bias gradient (iDLG), k = dL/db, and dL/dW = k x^T gives x = dL/dW^T k / |k|^2
  (least squares over every row, i.e. all rows weighted by their bias gradient);
* R-GAP's single-logit logistic head, Linear(n, 1), loss BCE-with-logits on t in {0, 1}.
  With bias, k = dL/db and t = 1 iff k < 0. Without bias, <dL/dW, W> = l * k = mu * l'(mu)
  where mu = (2t - 1) * l and l(mu) = log(1 + e^-mu); the scalar c = -mu / (1 + e^mu) is
  inverted with a bracketed root finder (brentq). c > 0 has one root (misclassified sample);
  c < 0 has two (correctly classified), and (t, l) and (1 - t, -l) always give the same c. The
  caller keeps every consistent (t, mu) as a hypothesis and lets the layers below decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

from attacks.base import AttackError

# mu* = 1 + W(1/e): the minimiser of g(mu) = -mu / (1 + e^mu), where g = -0.2785 (two roots above).
_G_ARGMIN = 1.2784645427610737


@dataclass
class HeadHypothesis:
    """One consistent explanation of the head gradient: label, dL/dlogits and the head input."""

    label: int
    k: np.ndarray
    x: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _nonzero(value: float, what: str) -> None:
    if not np.isfinite(value) or value == 0.0:
        raise AttackError(f"the {what} is zero or not finite; nothing to invert (was the gradient computed?)")


def cross_entropy_head(
    grad_w: np.ndarray,
    grad_b: np.ndarray | None,
    weight: np.ndarray,
    bias: np.ndarray | None,
    known_label: int | None,
) -> HeadHypothesis:
    """iDLG label + analytic input of a softmax head with bias."""
    if grad_b is None or bias is None:
        raise AttackError(
            "a cross-entropy head without bias is not supported by layer-wise inversion: dL/dW = k x^T then "
            "fixes x only up to scale; give the head a bias or use an optimisation attack"
        )
    k = np.asarray(grad_b, dtype=np.float64)
    norm2 = float(k @ k)
    _nonzero(norm2, "head bias gradient")
    label = int(np.argmin(k)) if known_label is None else int(known_label)
    x = grad_w.T @ k / norm2
    logits = weight @ x + bias
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    predicted = probs - np.eye(k.size)[label]
    info = {
        "head": "cross-entropy",
        "negative_bias_grads": int((k < 0).sum()),
        "softmax_check": float(np.linalg.norm(predicted - k) / np.sqrt(norm2)),
    }
    return HeadHypothesis(label, k, x, info)


def logistic_roots(c: float) -> list[float]:
    """All mu with -mu / (1 + e^mu) = c (one for c >= 0, two for g_min < c < 0), by brentq."""

    def g(mu: float) -> float:
        return float(-mu * expit(-mu))

    if c == 0.0:
        return [0.0]
    if c > 0:
        return [brentq(lambda m: g(m) - c, -(2.0 * c + 1.0), 0.0, xtol=1e-300, rtol=1e-15)]
    if c <= g(_G_ARGMIN):
        return [_G_ARGMIN]
    small = brentq(lambda m: g(m) - c, 0.0, _G_ARGMIN, xtol=1e-300, rtol=1e-15)
    upper = 2.0 * _G_ARGMIN
    while g(upper) <= c and upper < 1e4:
        upper *= 2.0
    large = brentq(lambda m: g(m) - c, _G_ARGMIN, upper, xtol=1e-300, rtol=1e-15)
    return [small, large]


def logistic_head(
    grad_w: np.ndarray,
    grad_b: np.ndarray | None,
    weight: np.ndarray,
    known_label: int | None,
    positive_input: bool,
) -> list[HeadHypothesis]:
    """Every (t, mu) consistent with the gradient of a single-logit BCE head.

    Label rule: known label if given; with a bias, t = 1 iff dL/db < 0 (k = sigmoid(l) - t);
    without bias, if the head input is known to be positive (sigmoid before it) then sign(dL/dW)
    = sign(k) and t = 1 iff sum(dL/dW) < 0; otherwise both labels stay as hypotheses.
    """
    g_row = np.asarray(grad_w, dtype=np.float64).reshape(-1)
    if grad_b is not None:
        k = float(np.ravel(grad_b)[0])
        _nonzero(k, "head bias gradient")
        label = int(k < 0) if known_label is None else int(known_label) % 2
        return [HeadHypothesis(label, np.array([k]), g_row / k, {"head": "logistic", "rule": "bias sign"})]
    c = float(g_row @ np.asarray(weight, dtype=np.float64).reshape(-1))
    _nonzero(float(np.abs(g_row).sum()), "head weight gradient")
    if known_label is not None:
        labels, rule = [int(known_label) % 2], "known label"
    elif positive_input:
        labels, rule = [int(g_row.sum() < 0)], "sign of dL/dW with positive head input"
    else:
        labels, rule = [0, 1], "consistency with the layer below"
    roots = logistic_roots(c)
    hypotheses = []
    for label in labels:
        for mu in roots:
            logit = mu if label == 1 else -mu
            k = float(expit(logit) - label)
            info = {"head": "logistic", "rule": rule, "c": c, "mu": mu, "roots": roots, "logit": logit}
            hypotheses.append(HeadHypothesis(label, np.array([k]), g_row / k, info))
    return hypotheses
