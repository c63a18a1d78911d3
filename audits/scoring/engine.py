"""The audit engine: (observed update, optional truth, context) -> audit rows and images.

The federated auditor (`fedsim.strategy.auditor.strategy`) and `fedsim audit`
(`audits.architecture.standalone`) both hand every update to `UpdateAuditor.audit`, so both
write the same `AuditRow`s, the same CSV columns (`AUDIT_COLUMNS`) and the same grids. An audit
never stops its caller: an attack that declines (`AttackError`) or breaks (any other exception)
becomes a row that says why, and an update whose node shares no training samples is still
attacked, its leakage left unscored.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from attacks.auto import CHOICE_KEY
from attacks.base import Attack, AttackError, ObservedUpdate, Reconstruction
from attacks.registry import build_attack
from attacks.text.token_leakage import ORDERED_KEY, TOKEN_SET_KEY
from audits.scoring.leakage import score_reconstruction
from audits.security.metric import SecurityReport, security_report
from audits.similarity.image import reported_psnr
from audits.similarity.text import Decode, TextScore, score_text

# Row status: the attack returned a reconstruction, refused the update (it does not apply to
# this model or threat model), or raised.
RECONSTRUCTED = "reconstructed"
DECLINED = "declined"
FAILED = "failed"
# A DP-SGD client whose Poisson-sampled batches were all empty trained on no sample: its update is
# the mechanism's noise alone, so there is nothing to reconstruct and nothing to score.
NOISE_ONLY = "noise only"
EMPTY_BATCH_NOTE = "the client's Poisson batch was empty: the update is noise only"

NO_TRUTH_NOTE = "leakage not measurable: the node shares no training samples (no audit-truth opt-in)"
NON_FINITE_NOTE = "the update holds non-finite values (NaN or Inf); nothing to attack"
# An update is called sparsified when, in the median tensor it changes, at least this share of the
# entries is exactly zero: a natural gradient is zero only where an input or activation is (blank
# pixels in a first layer), a top-k update (DLG's gradient pruning) almost everywhere.
SPARSE_SHARE = 0.5


@dataclass(frozen=True)
class Truth:
    """The samples a client trained on, as dataset labels (the auditor maps them to targets)."""

    inputs: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class AuditContext:
    """Where an update came from and what the attacker assumed; every row of it repeats this."""

    threat: str
    defences: str = ""  # the defences the update went through before the attacker saw it
    round: int | None = None  # federation round (None for `fedsim audit`)
    partition_id: int | None = None  # the client (None for `fedsim audit`)
    sample: int | None = None  # `fedsim audit`: the attacked sample's test-split index
    batch_size: int = 1
    local_steps: int = 1
    rank_score: float | None = None  # the model's security metric, computed once per model and round


TEXT_COLUMNS = ("token_precision", "token_recall", "exact_sequence", "rouge1", "rouge2", "bleu")


@dataclass
class AuditRow:
    """One attack on one update: the one row type of every `audit.csv`."""

    round: int | None
    partition_id: int | None
    sample: int | None
    attack: str
    threat: str
    defences: str  # space-separated labels, e.g. "dp-sgd(z=1.1,C=1) central-dp(server,z=0.8,C=1)"
    batch_size: int
    local_steps: int
    status: str  # RECONSTRUCTED, DECLINED, FAILED or NOISE_ONLY
    psnr: float | None  # mean over reconstructed images, each against its nearest true sample
    ssim: float | None
    label_score: float | None  # share of recovered labels matching a distinct true label (0..1)
    # Text attacks on token models (empty for images): token-set precision and recall, the share
    # of true sequences recovered verbatim, ROUGE-1/2 F and BLEU (0..100) of the recovered words.
    token_precision: float | None
    token_recall: float | None
    exact_sequence: float | None
    rouge1: float | None
    rouge2: float | None
    bleu: float | None
    recovered_labels: str  # space-separated, as the model's targets
    true_labels: str  # space-separated dataset labels; empty without truth
    rank_score: float | None
    seconds: float
    note: str

    @classmethod
    def from_csv(cls, record: Mapping[str, str]) -> AuditRow:
        """Parse one row as `csv.DictReader` returns it (empty cells are None)."""
        return cls(
            round=_optional(int, record["round"]),
            partition_id=_optional(int, record["partition_id"]),
            sample=_optional(int, record["sample"]),
            attack=record["attack"],
            threat=record["threat"],
            defences=record["defences"],
            batch_size=int(record["batch_size"]),
            local_steps=int(record["local_steps"]),
            status=record["status"],
            psnr=_optional(float, record["psnr"]),
            ssim=_optional(float, record["ssim"]),
            label_score=_optional(float, record["label_score"]),
            **{key: _optional(float, record.get(key, "")) for key in TEXT_COLUMNS},
            recovered_labels=record["recovered_labels"],
            true_labels=record["true_labels"],
            rank_score=_optional(float, record["rank_score"]),
            seconds=float(record["seconds"]),
            note=record["note"],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AUDIT_COLUMNS = tuple(f.name for f in fields(AuditRow))


@dataclass
class UpdateAudit:
    """Every attack's row on one update, and what an audit grid shows of it: the true sample the
    attacks came closest to, and per attack the reconstruction nearest to it with its own PSNR."""

    rows: list[AuditRow]
    original: np.ndarray | None  # None: the node shares no samples
    images: dict[str, np.ndarray | None] = field(default_factory=dict)
    image_psnr: dict[str, float | None] = field(default_factory=dict)
    original_note: str = "not shared\nby the node"  # shown in place of a missing original
    # Token models: the true batch (B, L) and each attack's recovered ids, for the text table.
    true_tokens: np.ndarray | None = None
    tokens: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class SecurityMeasure:
    """The security metric of one model at one set of weights, or why it could not be computed."""

    report: SecurityReport | None
    note: str = ""

    @property
    def score(self) -> float | None:
        """COPA's score; None without a report or for a partial one (untreated modules would
        otherwise count as attackable)."""
        return None if self.report is None or not self.report.complete else float(self.report.score)


def measure_security(model: torch.nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> SecurityMeasure:
    """The metric where layer-wise inversion applies; a note (never an exception) elsewhere, so
    e.g. non-finite global weights cannot stop a federation from inside its auditor."""
    try:
        report = security_report(model, input_shape, seed=seed)
        partial = "; ".join(part.note for part in report.untreated)
        return SecurityMeasure(report, f"partial: {partial}" if partial else "")
    except AttackError as err:
        return SecurityMeasure(None, f"not applicable: {err}")
    except Exception as err:  # an audit reports failures, it does not raise them
        return SecurityMeasure(None, f"failed: {type(err).__name__}: {err}")


def threat_model(batch_size: int, local_steps: int, exact: bool = False) -> str:
    """A short label of what the attacker observed: an exact gradient, or one estimated from a weight
    delta (Δw / lr for one step, the mean gradient along the trajectory for several)."""
    if exact:
        return f"fedsgd-b{batch_size} (exact gradient)"
    if local_steps == 1:
        return f"fedsgd-b{batch_size}" + (
            " (dw/lr: one gradient)" if batch_size == 1 else " (dw/lr: batch-mean gradient)"
        )
    return f"fedavg-b{batch_size}-s{local_steps} (gradient estimated as dw/(lr*steps))"


class UpdateAuditor:
    """Runs attacks (registry names or `Attack` objects) on observed updates and scores them."""

    def __init__(self, attacks: Sequence[str | Attack], decode: Decode | None = None) -> None:
        self.attacks: list[Attack] = [build_attack(a) if isinstance(a, str) else a for a in attacks]
        self.decode = decode  # token ids -> words, for ROUGE and BLEU (the dataset's tokenizer)

    def audit(self, update: ObservedUpdate, truth: Truth | None, context: AuditContext) -> UpdateAudit:
        threads = torch.get_num_threads()
        # The attacks' small graphs gain nothing from a second thread and slow down up to 50x
        # when another process (a Ray client) holds the other core.
        torch.set_num_threads(1)
        try:
            return self._audit(update, truth, context)
        finally:
            torch.set_num_threads(threads)

    def unreadable(self, context: AuditContext, note: str) -> UpdateAudit:
        """Rows for an update the caller could not even form (e.g. a malformed reply)."""
        rows = [_row(context, a.name, DECLINED, None, 0.0, note) for a in self.attacks]
        return UpdateAudit(rows, None, original_note="reply not\nreadable")

    def failed(self, context: AuditContext, note: str) -> UpdateAudit:
        """Rows for an update whose audit itself broke (e.g. the process attacking it died)."""
        rows = [_row(context, a.name, FAILED, None, 0.0, note) for a in self.attacks]
        return UpdateAudit(rows, None, original_note="audit\nfailed")

    def not_applicable(self, context: AuditContext, truth: Truth | None, note: str) -> UpdateAudit:
        """Rows for a model no attack here can face (e.g. one not trained by gradients)."""
        rows = [_row(context, a.name, DECLINED, truth, 0.0, note) for a in self.attacks]
        return _with_images(rows, {}, truth)

    def _audit(self, update: ObservedUpdate, truth: Truth | None, context: AuditContext) -> UpdateAudit:
        if truth is not None and len(truth.labels) == 0 and len(truth.inputs) == 0:
            rows = [_row(context, a.name, NOISE_ONLY, None, 0.0, EMPTY_BATCH_NOTE) for a in self.attacks]
            return UpdateAudit(rows, None, original_note="no sample:\nnoise only")
        truth, truth_note = _usable_truth(update, truth)
        if not all(bool(torch.isfinite(g).all()) for g in update.gradients.values()):
            rows = [_row(context, a.name, DECLINED, truth, 0.0, NON_FINITE_NOTE) for a in self.attacks]
            return _with_images(rows, {}, truth)
        targets = None if truth is None else _targets(update, truth)
        text = update.model.spec.modality == "tokens"
        sparsity_note = _sparsity_note(update)
        rows, recs = [], {}
        for attack in self.attacks:
            start = time.perf_counter()
            try:
                rec = _checked(attack.reconstruct(update))
                images = rec.inputs.detach().float().cpu().numpy()
                recovered = None if rec.labels is None else rec.labels.detach().reshape(-1).cpu().numpy()
                if text:
                    score = None if truth is None else self._text_score(rec, truth)
                else:
                    score = (
                        None
                        if targets is None
                        else score_reconstruction(images, recovered, truth.inputs, targets)
                    )
            except AttackError as err:
                rows.append(
                    _row(context, attack.name, DECLINED, truth, time.perf_counter() - start, str(err))
                )
                continue
            except Exception as err:  # one broken attack must not stop the audit
                note = f"{type(err).__name__}: {err}"
                rows.append(_row(context, attack.name, FAILED, truth, time.perf_counter() - start, note))
                continue
            recs[attack.name] = (images, score)
            choice = str(rec.diagnostics.get(CHOICE_KEY, ""))
            note = "; ".join(filter(None, [choice, _deficit_note(rec), sparsity_note, truth_note]))
            row = _row(context, attack.name, RECONSTRUCTED, truth, rec.seconds, note)
            row.recovered_labels = _label_text(recovered)
            if isinstance(score, TextScore):
                for key in TEXT_COLUMNS:
                    setattr(row, key, getattr(score, key))
            elif score is not None:
                row.psnr, row.ssim, row.label_score = score.psnr, score.ssim, score.label_score
            rows.append(row)
        if text:
            return _with_tokens(rows, recs, truth)
        return _with_images(rows, recs, truth)

    def _text_score(self, rec: Reconstruction, truth: Truth) -> TextScore:
        token_set = rec.diagnostics.get(TOKEN_SET_KEY)
        return score_text(
            rec.inputs.detach().long().cpu().numpy(),
            truth.inputs,
            ordered=bool(rec.diagnostics.get(ORDERED_KEY, False)),
            decode=self.decode,
            token_set=None if token_set is None else [int(t) for t in token_set],
        )


def _deficit_note(rec: Reconstruction) -> str:
    """Why a layer-wise reconstruction can be poor although the attack ran: some layer's system
    has fewer independent equations than unknowns, so its solution is not the input."""
    deficient = rec.diagnostics.get("rank_deficient_layers") or []
    if not deficient:
        return ""
    layers = ", ".join(str(layer) for layer in deficient)
    return f"rank-deficient layer {layers}: not uniquely invertible, expect a poor reconstruction"


def _sparsity_note(update: ObservedUpdate) -> str:
    """Why attacks degrade on a sparsified update: each zeroed entry is a constraint (an equation of
    a layer's system, a term of the gradient match) the attacker no longer has. Tensors left
    entirely unchanged (frozen groups) are not sparsification and do not count."""
    changed = [g for g in update.gradients.values() if bool((g != 0).any())]
    shares = [float((g == 0).double().mean()) for g in changed]
    if not shares or float(np.median(shares)) < SPARSE_SHARE:
        return ""
    zeros = sum(int((g == 0).sum()) for g in update.gradients.values())
    share = zeros / sum(g.numel() for g in update.gradients.values())
    return (
        f"update sparsified: {share:.0%} of gradient entries are zero, so most layer-wise constraints "
        "are missing"
    )


def _checked(rec: Reconstruction) -> Reconstruction:
    if not bool(torch.isfinite(rec.inputs).all()):
        raise FloatingPointError("the attack returned non-finite images")
    return rec


def _usable_truth(update: ObservedUpdate, truth: Truth | None) -> tuple[Truth | None, str]:
    """The truth, or None and why not: absent (no opt-in) or not shaped like the model's inputs."""
    if truth is None:
        return None, NO_TRUTH_NOTE
    shape = tuple(truth.inputs.shape[1:])
    if shape != tuple(update.input_shape) or len(truth.inputs) != len(truth.labels) or not len(truth.labels):
        return None, (
            f"leakage not measurable: the shared samples {truth.inputs.shape} with {len(truth.labels)} "
            f"labels do not fit the model's inputs {tuple(update.input_shape)}"
        )
    if update.model.spec.modality == "tokens":  # scored by the text metrics
        return truth, ""
    if update.model.spec.modality != "image":  # PSNR and SSIM score images; others need their own metric
        return None, f"leakage not measurable: {update.model.spec.modality} samples are not images"
    return truth, ""


def _targets(update: ObservedUpdate, truth: Truth) -> np.ndarray:
    """True labels as the model trains on them: what an attack can recover."""
    labels = torch.from_numpy(np.array(truth.labels, dtype=np.int64))  # a copy: decoded truth is read-only
    return update.model.targets(labels).detach().cpu().numpy()


def _row(
    context: AuditContext, attack: str, status: str, truth: Truth | None, seconds: float, note: str
) -> AuditRow:
    return AuditRow(
        round=context.round,
        partition_id=context.partition_id,
        sample=context.sample,
        attack=attack,
        threat=context.threat,
        defences=context.defences,
        batch_size=context.batch_size,
        local_steps=context.local_steps,
        status=status,
        psnr=None,
        ssim=None,
        label_score=None,
        **dict.fromkeys(TEXT_COLUMNS),
        recovered_labels="",
        true_labels="" if truth is None else _label_text(truth.labels),
        rank_score=context.rank_score,
        seconds=seconds,
        note=note,
    )


def _label_text(labels: Iterable[Any] | None) -> str:
    return "" if labels is None else " ".join(str(int(v)) for v in np.asarray(labels).reshape(-1))


def _with_images(
    rows: list[AuditRow], recs: dict[str, tuple[np.ndarray, Any]], truth: Truth | None
) -> UpdateAudit:
    """Pick what the grid shows: the true sample the best attack came closest to, and for each
    attack its reconstruction nearest to that sample, captioned with that image's own PSNR."""
    if truth is not None and np.asarray(truth.inputs).dtype.kind in "iu":  # token ids, not images
        return _with_tokens(rows, recs, truth)
    if truth is None:
        return UpdateAudit(rows, None, {name: images[0] for name, (images, _) in recs.items()})
    scored = [r for r in rows if r.psnr is not None]
    shown = 0
    if scored:
        best = max(scored, key=lambda r: r.psnr)
        shown = recs[best.attack][1].best_match
    original = truth.inputs[shown]
    audit = UpdateAudit(rows, original)
    for name, (images, _) in recs.items():
        psnrs = reported_psnr(np.repeat(original[None], len(images), 0), np.clip(images, 0, 1))
        nearest = int(np.argmax(psnrs))
        audit.images[name], audit.image_psnr[name] = images[nearest], float(psnrs[nearest])
    return audit


def _with_tokens(
    rows: list[AuditRow], recs: dict[str, tuple[np.ndarray, Any]], truth: Truth | None
) -> UpdateAudit:
    """A token update: no image for the grid, the true and recovered ids for the text table."""
    tokens = {name: np.rint(images).astype(np.int64) for name, (images, _) in recs.items()}
    true = None if truth is None else np.asarray(truth.inputs)
    note = "text: see\nthe text table" if truth is not None else "not shared\nby the node"
    images = {name: images[0] for name, (images, _) in recs.items()}  # the grid says "not an image"
    return UpdateAudit(rows, None, images, original_note=note, true_tokens=true, tokens=tokens)


def _optional(kind: type, cell: str) -> Any:
    return None if cell == "" else kind(cell)
