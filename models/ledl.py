"""LEDL: label-embedded dictionary learning (Shao et al., Neurocomputing 2020, arXiv 1903.03087).

LC-KSVD with its ℓ0 constraint replaced by an ℓ1 penalty:

    min_{B,W,A,S} ‖X − BS‖² + λ‖Y − WS‖² + ω‖Q − AS‖² + 2α‖S‖₁,   unit-norm columns of B, W, A,

X the flattened samples (d×N), Y their one-hot labels (c×N), Q the label-consistency target
(Q[k, n] = 1 when atom k belongs to sample n's class; the K atoms are split equally among the
classes). S is solved by ADMM (`admm_codes`), B, W, A by blockwise coordinate descent, one atom
column at a time (`coordinate_descent`). A test sample is lasso-coded on B alone and classified
by argmax(W s).

Not trained by gradients (`trained_by_gradients = False`): a client codes its samples with the
global B, W, A and sends the sufficient statistics of the dictionary step, CCᵀ, XCᵀ and YCᵀ,
sums over its samples (QCᵀ = MᵀYCᵀ follows from YCᵀ, M the atoms' class one-hot, so it is not
sent). The server sums them over clients and runs the coordinate-descent step
(`after_aggregation`): the federated round is exactly a centralised iteration. Its weights are
the round's starting ones on every client, so the strategy's average is discarded.

Initialisation: B, W, A are drawn from the model's init RNG (the run seed), never from data:
B's atoms are uniform in [0, 1) (images are non-negative), W and A Gaussian, all unit-norm.
Numerics are float64 throughout, so a round's result is a function of its inputs to rounding.
The ADMM is the standard scaled form (dual step ρ); the reference MATLAB code decays its dual
step γ instead, which does not converge to the lasso solution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from models.base import ExtraRecord, InputSpec, TrainingSettings, ZooModel

STATISTICS = "ledl_statistics"  # the extra record's name
DTYPE = torch.float64


@dataclass(frozen=True)
class Statistics:
    """Sums over samples of CCᵀ (K×K), XCᵀ (d×K), YCᵀ (c×K), and how many samples they hold."""

    cct: Tensor
    xct: Tensor
    yct: Tensor
    samples: int

    def __add__(self, other: Statistics) -> Statistics:
        return Statistics(
            self.cct + other.cct, self.xct + other.xct, self.yct + other.yct, self.samples + other.samples
        )

    def to_record(self) -> dict[str, float | int | np.ndarray]:
        return {
            "cct": self.cct.numpy().copy(),
            "xct": self.xct.numpy().copy(),
            "yct": self.yct.numpy().copy(),
            "samples": int(self.samples),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, float | int | np.ndarray]) -> Statistics:
        arrays = [torch.from_numpy(np.asarray(record[k], dtype=np.float64)) for k in ("cct", "xct", "yct")]
        return cls(*arrays, int(record["samples"]))


def soft_threshold(values: Tensor, threshold: float) -> Tensor:
    return torch.sign(values) * torch.clamp(values.abs() - threshold, min=0.0)


def admm_codes(
    gram: Tensor, correlation: Tensor, alpha: float, rho: float = 1.0, iterations: int = 200
) -> Tensor:
    """argmin_S ½·tr(SᵀGS) − tr(SᵀR) + α‖S‖₁ by scaled ADMM (S = Z), column by column.

    With G = BᵀB + λWᵀW + ωAᵀA and R = BᵀX + λWᵀY + ωAᵀQ this is the LEDL coding step (the
    objective halved); with G = BᵀB, R = BᵀX the test-time lasso. Returns the sparse Z (K×N).
    Columns are independent, so coding a set of samples in any split gives the same codes.
    """
    size = gram.shape[0]
    factor = torch.linalg.cholesky(gram + rho * torch.eye(size, dtype=gram.dtype))
    z = torch.zeros_like(correlation)
    u = torch.zeros_like(correlation)
    for _ in range(iterations):
        c = torch.cholesky_solve(correlation + rho * (z - u), factor)
        z = soft_threshold(c + u, alpha / rho)
        u = u + c - z
    return z


def normalise_columns(matrix: Tensor) -> Tensor:
    return matrix / matrix.norm(dim=0, keepdim=True).clamp_min(1e-300)


def coordinate_descent(dictionary: Tensor, cct: Tensor, target_ct: Tensor) -> Tensor:
    """One sweep of blockwise coordinate descent on min ‖T − DC‖² over unit-norm columns of D:
    d_j ← normalise(TCᵀ_j − D·(CCᵀ)_j with its j-th entry zeroed), the exact minimiser in d_j of
    the objective with the other columns fixed. A column with a zero update (an unused atom) is
    kept as it is."""
    result = dictionary.clone()
    for j in range(result.shape[1]):
        column = cct[:, j].clone()
        column[j] = 0.0
        update = target_ct[:, j] - result @ column
        norm = update.norm()
        if norm > 0:
            result[:, j] = update / norm
    return result


class Ledl(ZooModel):
    """Dictionary B (d×K), label map W (c×K) and consistency map A (K×K) as non-trainable
    float64 parameters; `forward` lasso-codes on B and returns W s as the class scores."""

    head = "other"
    trained_by_gradients = False

    def __init__(
        self,
        spec: InputSpec,
        atoms_per_class: int,
        lam: float,
        omega: float,
        alpha: float,
        alpha_test: float,
        rho: float,
        admm_iterations: int,
    ) -> None:
        super().__init__(spec)
        classes, dim = spec.num_classes, spec.num_features
        atoms = atoms_per_class * classes
        self.lam, self.omega, self.alpha, self.alpha_test = lam, omega, alpha, alpha_test
        self.rho, self.admm_iterations = rho, admm_iterations
        # M[c, k] = 1 when atom k belongs to class c; Q = Mᵀ Y.
        atom_class = torch.arange(atoms) // atoms_per_class
        self.register_buffer("atom_classes", F.one_hot(atom_class, classes).T.to(DTYPE), persistent=False)
        self.B = nn.Parameter(normalise_columns(torch.rand(dim, atoms, dtype=DTYPE)), requires_grad=False)
        self.W = nn.Parameter(self.atom_classes.clone(), requires_grad=False)
        self.A = nn.Parameter(torch.eye(atoms, dtype=DTYPE), requires_grad=False)
        self._statistics: Statistics | None = None

    # --- coding -----------------------------------------------------------------------------
    def flatten(self, inputs: Tensor) -> Tensor:
        """Samples as the columns of X (d×N), float64."""
        return inputs.reshape(len(inputs), -1).to(DTYPE).T

    def code(self, inputs: Tensor) -> Tensor:
        """Test-time codes (K×N): the lasso min ‖x − Bs‖² + 2α_test‖s‖₁ on B alone."""
        b = self.B.detach()
        correlation = b.T @ self.flatten(inputs)
        return admm_codes(b.T @ b, correlation, self.alpha_test, self.rho, self.admm_iterations)

    def training_codes(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """Training codes (K×N) under the full objective, labels included."""
        b, w, a = self.B.detach(), self.W.detach(), self.A.detach()
        y = F.one_hot(labels.long(), self.spec.num_classes).T.to(DTYPE)
        q = self.atom_classes.T @ y
        gram = b.T @ b + self.lam * w.T @ w + self.omega * a.T @ a
        correlation = b.T @ self.flatten(inputs) + self.lam * w.T @ y + self.omega * a.T @ q
        return admm_codes(gram, correlation, self.alpha, self.rho, self.admm_iterations)

    def statistics(self, inputs: Tensor, labels: Tensor, codes: Tensor | None = None) -> Statistics:
        """The dictionary step's sufficient statistics of these samples (coded here unless
        their training `codes` are given)."""
        codes = self.training_codes(inputs, labels) if codes is None else codes
        y = F.one_hot(labels.long(), self.spec.num_classes).T.to(DTYPE)
        return Statistics(codes @ codes.T, self.flatten(inputs) @ codes.T, y @ codes.T, len(labels))

    def objective(self, inputs: Tensor, labels: Tensor, codes: Tensor) -> float:
        """The LEDL objective of these samples at these codes (for tests and reports)."""
        x = self.flatten(inputs)
        y = F.one_hot(labels.long(), self.spec.num_classes).T.to(DTYPE)
        q = self.atom_classes.T @ y
        b, w, a = self.B.detach(), self.W.detach(), self.A.detach()
        return float(
            (x - b @ codes).square().sum()
            + self.lam * (y - w @ codes).square().sum()
            + self.omega * (q - a @ codes).square().sum()
            + 2 * self.alpha * codes.abs().sum()
        )

    def forward(self, inputs: Tensor) -> Tensor:
        return (self.W.detach() @ self.code(inputs)).T.to(torch.float32)

    def centralised_step(self, inputs: Tensor, labels: Tensor) -> None:
        """One centralised LEDL iteration on these samples (code them all, then one
        coordinate-descent sweep), in place: the reference a federated round must equal."""
        stats = self.statistics(inputs, labels)
        new = dictionary_step(self.B.detach(), self.W.detach(), self.A.detach(), stats, self.atom_classes)
        with torch.no_grad():
            for parameter, value in zip((self.B, self.W, self.A), new, strict=True):
                parameter.copy_(value)

    # --- the federated step -----------------------------------------------------------------
    def local_update(self, data_loader: DataLoader, settings: TrainingSettings, server_round: int) -> float:
        """Code every training sample once (whatever the epochs and step cap) and keep the
        statistics for `extra_records`; returns the mean objective per sample."""
        batches = list(data_loader)  # one pass: a shuffling loader orders each pass anew
        inputs = torch.cat([batch[0] for batch in batches])
        labels = torch.cat([batch[1] for batch in batches])
        codes = self.training_codes(inputs, labels)
        self._statistics = self.statistics(inputs, labels, codes)
        return self.objective(inputs, labels, codes) / len(labels)

    def extra_records(self) -> dict[str, ExtraRecord]:
        if self._statistics is None:
            return {}
        record = self._statistics.to_record()
        self._statistics = None
        return {STATISTICS: record}

    def extra_record_problem(self, name: str, payload: ExtraRecord) -> str | None:
        if name != STATISTICS:
            return f"unexpected record {name!r}; LEDL clients send only {STATISTICS!r}"
        atoms, dim, classes = self.B.shape[1], self.B.shape[0], self.spec.num_classes
        shapes = {"cct": (atoms, atoms), "xct": (dim, atoms), "yct": (classes, atoms)}
        for key, shape in shapes.items():
            value = payload.get(key)
            if not isinstance(value, np.ndarray) or value.shape != shape:
                got = getattr(value, "shape", type(value).__name__)
                return f"field {key!r} must be an array of shape {shape}, got {got}"
        samples = payload.get("samples")
        if not isinstance(samples, int) or samples < 1:
            return f"field 'samples' must be a positive whole number, got {samples!r}"
        return None

    def after_aggregation(
        self,
        aggregated: Mapping[str, np.ndarray],
        previous: Mapping[str, np.ndarray],
        records: Sequence[Mapping[str, ExtraRecord]],
        settings: TrainingSettings,
        server_round: int,
    ) -> dict[str, np.ndarray]:
        """Sum the clients' statistics and run one coordinate-descent sweep from the round's
        starting B, W, A (`previous`; the clients did not change them). No statistics: the
        round's start unchanged."""
        received = [Statistics.from_record(r[STATISTICS]) for r in records if STATISTICS in r]
        result = {name: np.array(value, copy=True) for name, value in previous.items()}
        if not received:
            return result
        total = received[0]
        for stats in received[1:]:
            total = total + stats
        b, w, a = dictionary_step(
            *(torch.from_numpy(np.asarray(previous[k], dtype=np.float64)) for k in ("B", "W", "A")),
            total,
            self.atom_classes,
        )
        result.update(B=b.numpy(), W=w.numpy(), A=a.numpy())
        return result


def dictionary_step(
    b: Tensor, w: Tensor, a: Tensor, stats: Statistics, atom_classes: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The server's update: one coordinate-descent sweep of each of B, W, A on the summed
    statistics (QCᵀ = MᵀYCᵀ). A pure function, so a federated round equals a centralised one."""
    qct = atom_classes.T @ stats.yct
    return (
        coordinate_descent(b, stats.cct, stats.xct),
        coordinate_descent(w, stats.cct, stats.yct),
        coordinate_descent(a, stats.cct, qct),
    )


def ledl(
    spec: InputSpec,
    atoms_per_class: int = 10,
    lam: float = 2.0,
    omega: float = 2.0,
    alpha: float = 2.0,
    alpha_test: float = 0.3,
    rho: float = 1.0,
    admm_iterations: int = 100,
) -> Ledl:
    """LEDL on flattened images or feature vectors: `atoms_per_class` atoms per class (K = that ×
    classes), label weight `lam` (λ), consistency weight `omega` (ω), ℓ1 weights `alpha` (training
    codes) and `alpha_test` (test codes), ADMM penalty `rho` and iterations per coding. The defaults
    were chosen on digits (pixels in [0, 1]): the paper's α = 1e-6 (ResNet features) gives dense
    codes there and about 0.4 test accuracy after 20 iterations instead of 0.95 after 8."""
    if atoms_per_class < 1:
        raise ValueError(f"atoms_per_class must be >= 1 (got {atoms_per_class}); e.g. atoms_per_class=10")
    for name, value in (("lam", lam), ("omega", omega), ("alpha", alpha), ("alpha_test", alpha_test)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0 (got {value}); 0 turns its term off")
    if not rho > 0:
        raise ValueError(f"rho must be > 0 (got {rho}); e.g. rho=1")
    if admm_iterations < 1:
        raise ValueError(f"admm_iterations must be >= 1 (got {admm_iterations}); e.g. admm_iterations=200")
    return Ledl(spec, atoms_per_class, lam, omega, alpha, alpha_test, rho, admm_iterations)
