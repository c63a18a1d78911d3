"""Text-leakage metrics: how much of a client's text a reconstruction recovered.

Token precision and recall compare sets of token ids (padding excluded: it is not text);
exact-sequence rate is the share of true sequences recovered verbatim (padding stripped);
ROUGE-1/2 (`rouge-score`, F-measure) and corpus BLEU (`sacrebleu`, 0..100) compare decoded
words, each recovered sequence paired with the true one it shares most tokens with. The order
metrics apply only to reconstructions that claim positions; a bag of tokens gets None there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

PADDING_ID = 0
Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class TextScore:
    """One reconstruction against the true batch."""

    token_precision: float
    token_recall: float
    exact_sequence: float | None
    rouge1: float | None
    rouge2: float | None
    bleu: float | None


def token_precision_recall(recovered: set[int], true: set[int]) -> tuple[float, float]:
    """|recovered ∩ true| / |recovered| and / |true| (1.0 for an empty side: nothing claimed or missed)."""
    hit = len(recovered & true)
    return (hit / len(recovered) if recovered else 1.0, hit / len(true) if true else 1.0)


def strip(sequence: Sequence[int], padding_id: int = PADDING_ID) -> list[int]:
    """The tokens of a sequence without padding and unresolved (negative) positions."""
    return [int(t) for t in sequence if int(t) != padding_id and int(t) >= 0]


def _decode_default(ids: Sequence[int]) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def score_text(
    recovered: np.ndarray,
    true: np.ndarray,
    ordered: bool,
    decode: Decode | None = None,
    padding_id: int = PADDING_ID,
    token_set: Sequence[int] | None = None,
) -> TextScore:
    """Score recovered token ids (B', L') against the true batch (B, L). `token_set`, where the
    attack reports one, is what precision and recall score (an attack may know the batch's tokens
    better than its assembled sequences). Without `decode` the words are the ids themselves
    (w17 ...), which gives the same ROUGE and BLEU up to tokenisation."""
    decode = decode or _decode_default
    true_rows = [strip(row, padding_id) for row in np.asarray(true).reshape(len(true), -1)]
    rec_rows = [strip(row, padding_id) for row in np.asarray(recovered).reshape(len(recovered), -1)]
    claimed = {t for row in rec_rows for t in row} if token_set is None else set(strip(token_set, padding_id))
    precision, recall = token_precision_recall(claimed, {t for row in true_rows for t in row})
    if not ordered:
        return TextScore(precision, recall, None, None, None, None)
    exact = sum(any(row == rec for rec in rec_rows) for row in true_rows) / len(true_rows)
    pairs = [(max(true_rows, key=lambda t, r=rec: len(set(t) & set(r))), rec) for rec in rec_rows]
    references = [decode(t) for t, _ in pairs]
    hypotheses = [decode(r) for _, r in pairs]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"])
    scores = [scorer.score(ref, hyp) for ref, hyp in zip(references, hypotheses, strict=True)]
    rouge1 = float(np.mean([s["rouge1"].fmeasure for s in scores]))
    rouge2 = float(np.mean([s["rouge2"].fmeasure for s in scores]))
    bleu = float(BLEU(tokenize="none", effective_order=True).corpus_score(hypotheses, [references]).score)
    return TextScore(precision, recall, exact, rouge1, rouge2, bleu)
