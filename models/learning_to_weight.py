"""Learning to Weight (Moreo, Esuli & Sebastiani, IEEE TKDE 2020), for token inputs.

    tokens -> tf (B, V): per-document term counts (scatter-add, padding id 0 ignored)
           -> per class k: x_k = L2-normalise(log(1 + tf) · w_k),  w_k[t] = g(tpr_kt, fpr_kt)
           -> logit_k = <W_k, x_k> + b_k -> softmax cross-entropy

(tpr_kt, fpr_kt) = (P(t | c_k), P(t | not c_k)) come from the term×class document-frequency
contingency counts of the training data. `weighting="learned"` makes g a small MLP 2→H→1
(ReLU hidden layer, softplus output so that g > 0; the paper's `forcepos` is a ReLU), trained
end to end with the classifier; the fixed weightings "idf", "chi2" and "ig" are the paper's
baselines (tf-idf, tf-χ², tf-ig) on the same head, so a comparison changes the weighting only.

Multiclass (our choice; the paper's tasks are binary, one class against the rest): one
one-vs-rest weighting per class with g shared across classes, each class scoring its own
weighted document vector, and the K scores trained with softmax cross-entropy (the paper uses a
sigmoid per binary task; softmax keeps one prediction per document and the zoo's "ce" head).

Federated counts (the policy, see `extra_records` and `after_aggregation`): the counts are two
integer buffers of the model (`term_class_df` (K, V), `class_docs` (K,)), so they travel with
the weights. While the global counts are empty (round 1, the "counting" round), a client counts
its own training documents, trains on its *local* rates (rates, not counts, so they are close to
the global ones on similar clients) and sends its counts as the extra record `counts`; the server
checks it (shape, non-negative whole numbers, df ≤ class size) and writes the sum of the round's
records into the buffers. Counts are additive, so the sum equals the counts of the pooled data
of the clients that reported. From then on every client uses the same (tpr, fpr), sends no
record, and the server resets the buffers to the round's global values after every aggregation,
so no client can change them. What the counts reveal: the server learns, per class, how many of
a client's documents contain each vocabulary term: the token set of a one-document client, and
document frequencies otherwise (`benchmarks/fidelity/ltw.py` measures it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from models.base import ExtraRecord, InputSpec, TrainingSettings, ZooModel

Weighting = Literal["learned", "idf", "chi2", "ig"]
WEIGHTINGS: tuple[str, ...] = ("learned", "idf", "chi2", "ig")
COUNTS_RECORD = "counts"
TERM_CLASS_DF = "term_class_df"
CLASS_DOCS = "class_docs"
PADDING_ID = 0


def term_frequencies(tokens: Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, V) float counts of each term in each document; padding (id 0) is not a term."""
    counts = torch.zeros(tokens.shape[0], vocab_size, dtype=dtype, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=dtype))
    counts[:, PADDING_ID] = 0.0
    return counts


def contingency_counts(
    tokens: Tensor, labels: Tensor, vocab_size: int, classes: int
) -> tuple[Tensor, Tensor]:
    """(term_class_df (K, V), class_docs (K,)), int64: how many documents of each class contain
    each term (at least once), and how many documents each class has."""
    present = (term_frequencies(tokens, vocab_size) > 0).to(torch.int64)
    df = torch.zeros(classes, vocab_size, dtype=torch.int64)
    df.index_add_(0, labels.to(torch.int64), present)
    return df, torch.bincount(labels.to(torch.int64), minlength=classes)


def rates(df: Tensor, class_docs: Tensor) -> tuple[Tensor, Tensor]:
    """(tpr, fpr), each (K, V): P(t | c_k) = df_kt / N_k and P(t | not c_k) = (df_t − df_kt) /
    (N − N_k); 0 where the class (or its complement) has no documents."""
    df, n_k = df.double(), class_docs.double()
    n = n_k.sum()
    tpr = df / n_k.clamp(min=1).unsqueeze(1)
    fpr = (df.sum(0, keepdim=True) - df) / (n - n_k).clamp(min=1).unsqueeze(1)
    return tpr.float(), fpr.float()


def _cells(df: Tensor, class_docs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The 4-cell contingency table per (class, term) as probabilities, and N."""
    a = df.double()
    n_k = class_docs.double().unsqueeze(1)
    n = class_docs.double().sum().clamp(min=1)
    b = a.sum(0, keepdim=True) - a  # term present, other class
    c = n_k - a  # term absent, this class
    d = n - n_k - b  # term absent, other class
    return a / n, b / n, c / n, d / n, n


def chi_square(df: Tensor, class_docs: Tensor) -> Tensor:
    """χ²(t, c_k) = N (ad − bc)² / ((a+b)(c+d)(a+c)(b+d)) on the probability cells, (K, V)."""
    a, b, c, d, n = _cells(df, class_docs)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    value = n * (a * d - b * c) ** 2 / denominator.clamp(min=1e-300)
    return torch.where(denominator > 0, value, torch.zeros_like(value)).float()


def information_gain(df: Tensor, class_docs: Tensor) -> Tensor:
    """IG(t, c_k) = Σ over t/¬t, c/¬c of P(t, c) log(P(t, c) / (P(t) P(c))), (K, V)."""
    a, b, c, d, _ = _cells(df, class_docs)
    total = torch.zeros_like(a)
    for joint, term, cls in ((a, a + b, a + c), (b, a + b, b + d), (c, c + d, a + c), (d, c + d, b + d)):
        ratio = joint / (term * cls).clamp(min=1e-300)
        total = total + torch.where(
            joint > 0, joint * torch.log(ratio.clamp(min=1e-300)), torch.zeros_like(a)
        )
    return total.float()


def inverse_document_frequency(df: Tensor, class_docs: Tensor) -> Tensor:
    """log((1 + N) / (1 + df_t)) + 1 (scikit-learn's smoothed idf), the same for every class, (K, V)."""
    n = class_docs.double().sum()
    idf = torch.log((1 + n) / (1 + df.double().sum(0))) + 1
    return idf.float().expand(df.shape[0], -1)


class LearningToWeight(ZooModel):
    """tf · g(tpr, fpr), L2-normalised per class, under a linear one-vs-rest scorer."""

    head = "ce"
    per_sample_loss = True

    def __init__(self, spec: InputSpec, weighting: Weighting, hidden: int, lr: float) -> None:
        super().__init__(spec)
        classes, vocab = spec.num_classes, int(spec.vocab_size or 0)
        self.weighting = weighting
        self.lr = lr
        self.metric_names = ("accuracy", *confusion_names(classes))
        self.g = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Softplus())
        # g > 0 through a softplus, not the paper's output ReLU (`forcepos`): with a ReLU, g fell
        # to 0 for every term within 10 epochs on fortunes (all features 0, no gradient left).
        # It starts near softplus(1) ≈ 1.3 everywhere: plain log-tf weighting.
        with torch.no_grad():
            self.g[2].weight.mul_(0.1)
            self.g[2].bias.fill_(1.0)
        if weighting != "learned":
            self.g.requires_grad_(False)
        # The scorer: row k of its weight and bias score class k's own weighted vector (see
        # forward_embedded), so it is never called as a layer; registered last, it is the
        # model's output layer for attacks that read one (iDLG's label rule).
        self.classifier = nn.Linear(vocab, classes)
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer(TERM_CLASS_DF, torch.zeros(classes, vocab, dtype=torch.int64))
        self.register_buffer(CLASS_DOCS, torch.zeros(classes, dtype=torch.int64))
        self._record: dict[str, np.ndarray] | None = None

    # --- weights -------------------------------------------------------------------------------
    def counts_known(self) -> bool:
        return bool(self.class_docs.sum() > 0)

    def term_weights(self) -> Tensor:
        """w (K, V): the weighting of every term for every class, from the model's counts, in
        the parameters' dtype (an auditor may run the model in float64)."""
        df, n_k, dtype = self.term_class_df, self.class_docs, self.classifier.weight.dtype
        if self.weighting == "idf":
            return inverse_document_frequency(df, n_k).to(dtype)
        if self.weighting == "chi2":
            return chi_square(df, n_k).to(dtype)
        if self.weighting == "ig":
            return information_gain(df, n_k).to(dtype)
        tpr, fpr = (rate.to(dtype) for rate in rates(df, n_k))
        # g on each distinct (tpr, fpr) pair once: counts take few values (most terms are rare,
        # all are (0, 0) before the counts are known), and an auditor differentiating the
        # gradient would otherwise carry g's hidden layer for all K·V terms per tangent.
        pairs, where = torch.unique(
            torch.stack([tpr, fpr], dim=-1).reshape(-1, 2), dim=0, return_inverse=True
        )
        return self.g(pairs).squeeze(-1)[where].reshape(tpr.shape)

    # --- forward -------------------------------------------------------------------------------
    def embed(self, inputs: Tensor) -> Tensor:
        """The continuous input is the bag of words: term counts (B, V)."""
        weight = self.classifier.weight
        return term_frequencies(inputs, weight.shape[1], weight.dtype)

    def forward_embedded(self, embedded: Tensor) -> Tensor:
        """logit_k = <W_k, l ⊙ w_k> / ‖l ⊙ w_k‖ + b_k with l = log(1 + tf), computed as two
        (B, V)·(V, K) products instead of K weighted copies of the batch."""
        logtf = torch.log1p(embedded)
        weights = self.term_weights()
        scores = logtf @ (weights * self.classifier.weight).T
        norms = torch.sqrt((logtf**2) @ (weights**2).T + 1e-12)
        return scores / norms + self.classifier.bias

    def forward(self, inputs: Tensor) -> Tensor:
        return self.forward_embedded(self.embed(inputs))

    def metrics(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        """Accuracy, and per class the fractions of the batch that are true positives, false
        positives and false negatives: batch means that average exactly over batches, from which
        `macro_f1` computes the set's macro-F1 (itself no batch mean)."""
        predicted = self.predict(outputs)
        result = {"accuracy": float((predicted == targets).double().mean())}
        for k in range(outputs.shape[-1]):
            hit, real = predicted == k, targets == k
            result[f"tp_{k}"] = float((hit & real).double().mean())
            result[f"fp_{k}"] = float((hit & ~real).double().mean())
            result[f"fn_{k}"] = float((~hit & real).double().mean())
        return result

    # --- local training ------------------------------------------------------------------------
    def configure_optimizer(self, settings: TrainingSettings, server_round: int) -> torch.optim.Optimizer:
        """Adam at the model's `lr` (the paper's optimiser; the run's SGD settings do not apply)
        over g (when learned) and the classifier."""
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr)

    def before_local_training(self, data_loader: DataLoader, server_round: int) -> None:
        """While the global counts are empty, count this client's documents, train on them and
        keep them to send (see the module docstring)."""
        self._record = None
        if self.counts_known():
            return
        ordered = DataLoader(data_loader.dataset, batch_size=1024, shuffle=False)  # no RNG drawn
        df = torch.zeros_like(self.term_class_df)
        docs = torch.zeros_like(self.class_docs)
        for inputs, labels, *_ in ordered:
            batch_df, batch_docs = contingency_counts(inputs, labels, df.shape[1], df.shape[0])
            df += batch_df
            docs += batch_docs
        self.term_class_df.copy_(df)
        self.class_docs.copy_(docs)
        self._record = {TERM_CLASS_DF: df.numpy().copy(), CLASS_DOCS: docs.numpy().copy()}

    def extra_records(self) -> dict[str, ExtraRecord]:
        return {} if self._record is None else {COUNTS_RECORD: self._record}

    # --- server side ---------------------------------------------------------------------------
    def extra_record_problem(self, name: str, payload: ExtraRecord) -> str | None:
        if name != COUNTS_RECORD:
            return f"learning-to-weight sends no record {name!r}"
        return counts_problem(payload, *self.term_class_df.shape)

    def after_aggregation(
        self,
        aggregated: Mapping[str, np.ndarray],
        previous: Mapping[str, np.ndarray],
        records: Sequence[Mapping[str, ExtraRecord]],
        settings: TrainingSettings,
        server_round: int,
    ) -> dict[str, np.ndarray]:
        """The counts are the round's global counts when those are known (whatever clients
        returned), else the sum of this round's valid count records; the rest as aggregated."""
        result = dict(aggregated)
        known = np.asarray(previous[CLASS_DOCS]).sum() > 0
        counts = [r[COUNTS_RECORD] for r in records if COUNTS_RECORD in r]
        if known:
            df, docs = previous[TERM_CLASS_DF], previous[CLASS_DOCS]
        else:
            df, docs = sum_counts(counts, *self.term_class_df.shape)
        result[TERM_CLASS_DF] = np.asarray(df).astype(aggregated[TERM_CLASS_DF].dtype)
        result[CLASS_DOCS] = np.asarray(docs).astype(aggregated[CLASS_DOCS].dtype)
        return result


def confusion_names(classes: int) -> tuple[str, ...]:
    return tuple(f"{kind}_{k}" for k in range(classes) for kind in ("tp", "fp", "fn"))


def macro_f1(metrics: Mapping[str, float], classes: int) -> float:
    """Macro-F1 from the per-class tp/fp/fn fractions of `metrics` (an evaluation's, or a run's
    `eval_` columns with the prefix removed): mean over classes of 2tp / (2tp + fp + fn), a class
    with no positives and no predictions counting 0 (scikit-learn's zero_division=0)."""
    scores = []
    for k in range(classes):
        tp, fp, fn = (float(metrics[f"{kind}_{k}"]) for kind in ("tp", "fp", "fn"))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator > 0 else 0.0)
    return float(np.mean(scores))


def counts_problem(payload: Mapping[str, object], classes: int, vocab: int) -> str | None:
    """Why a received count record is unusable, or None."""
    expected = {TERM_CLASS_DF: (classes, vocab), CLASS_DOCS: (classes,)}
    if set(payload) != set(expected):
        return f"count record has fields {sorted(payload)}, expected {sorted(expected)}"
    for key, shape in expected.items():
        value = payload[key]
        if not isinstance(value, np.ndarray) or value.shape != shape:
            return f"count field {key!r} is not an array of shape {shape}"
        if value.dtype.kind not in "iu":
            return f"count field {key!r} has dtype {value.dtype}, not whole numbers"
        if (value < 0).any():
            return f"count field {key!r} holds negative counts"
    df, docs = payload[TERM_CLASS_DF], payload[CLASS_DOCS]
    if (df > np.asarray(docs)[:, None]).any():  # type: ignore[index]
        return "count record says more documents of a class contain a term than the class has"
    return None


def sum_counts(
    records: Sequence[Mapping[str, object]], classes: int, vocab: int
) -> tuple[np.ndarray, np.ndarray]:
    """The pooled counts: the element-wise sum of the clients' count records (int64)."""
    df = np.zeros((classes, vocab), dtype=np.int64)
    docs = np.zeros(classes, dtype=np.int64)
    for record in records:
        df += np.asarray(record[TERM_CLASS_DF], dtype=np.int64)
        docs += np.asarray(record[CLASS_DOCS], dtype=np.int64)
    return df, docs


def learning_to_weight(
    spec: InputSpec, weighting: str = "learned", hidden: int = 64, lr: float = 0.005
) -> LearningToWeight:
    """LTW on token inputs: `weighting` learned (g an MLP 2→`hidden`→1) or a fixed baseline
    (idf, chi2, ig); Adam at `lr` (the paper's 0.005)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is unknown; use one of {', '.join(WEIGHTINGS)}")
    if spec.num_classes < 2:
        raise ValueError("learning-to-weight needs at least two classes (tpr and fpr compare them)")
    if hidden < 1:
        raise ValueError(f"hidden must be at least 1, got {hidden}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return LearningToWeight(spec, weighting, hidden, lr)  # type: ignore[arg-type]
