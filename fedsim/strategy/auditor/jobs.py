"""One audited round as plain data, and the functions that attack and draw it.

The serial auditor (inside the round) and the audit worker processes (`pending`) run these
same functions on the same inputs, so both write the same rows and the same grids. Everything
here is plain data (numpy arrays, dataclasses, strings), never a Flower message: the server
thread decodes replies, which is cheap, and ships only what an attack reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attacks.base import ObservedUpdate
from audits.scoring.engine import AuditContext, Truth, UpdateAudit, UpdateAuditor, measure_security
from audits.scoring.summary import save_audit_grid
from audits.scoring.text_table import text_table
from fedsim.training.client_step import ClientStep
from models import ZooModel
from models.base import load_federated_state

# How an audit row says its update's gradient estimate is approximate (`ObservedUpdate.approximation`).
APPROXIMATE_NOTE = "gradient estimate dw/(lr*steps) is approximate: {reason}"


@dataclass(frozen=True)
class PlainState:
    """A state dict as numpy arrays, to cross a process boundary without torch's shared-memory
    pickling. bfloat16 (which numpy lacks) travels as its raw int16 bits, so nothing is rounded."""

    arrays: dict[str, np.ndarray]
    bfloat16: frozenset[str] = frozenset()

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> PlainState:
        bf16 = frozenset(name for name, t in state.items() if t.dtype == torch.bfloat16)
        return cls(
            {
                name: (t.view(torch.int16) if name in bf16 else t).detach().cpu().numpy()
                for name, t in state.items()
            },
            bf16,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: torch.from_numpy(np.array(a)) for name, a in self.arrays.items()}
        return {name: t.view(torch.bfloat16) if name in self.bfloat16 else t for name, t in out.items()}


@dataclass(frozen=True)
class ReplyJob:
    """One audited reply as the server decoded it: its context, its returned weights and its truth."""

    context: AuditContext
    local: PlainState | None  # None: the reply could not be read (`note` says why)
    truth: Truth | None
    note: str = ""


def round_model(make_model: Callable[[], ZooModel], global_state: Mapping[str, torch.Tensor]) -> ZooModel:
    """The whole model at the round's global federated state, over a fresh build. The build seeds
    torch's global generator; fork_rng keeps the caller's stream (the server's) untouched."""
    with torch.random.fork_rng(devices=[]):
        model = make_model()
    load_federated_state(model, {k: v.float() for k, v in global_state.items()})
    return model


def security_score(model: ZooModel) -> float | None:
    """The model's security metric at this round's weights: computed once per round."""
    return measure_security(model, tuple(model.spec.shape)).score


def audit_reply(
    auditor: UpdateAuditor,
    model: ZooModel,
    global_state: Mapping[str, torch.Tensor],
    job: ReplyJob,
    step: ClientStep,
) -> UpdateAudit:
    """Attack one reply, its gradient estimated with the round's client step (`step`, read from
    `model` once per round). Torch's global generator is seeded from the round and the client, so
    an attack that drew from it would give the same result in a worker as in the server thread."""
    context = job.context
    if job.local is None:
        return auditor.unreadable(context, job.note)
    try:
        before, after = weights_around(model, global_state, job.local.tensors())
        update = step.observe(model, before, after, context.local_steps, context.batch_size)
    except Exception as err:  # a reply the auditor cannot read must not stop the round
        return auditor.unreadable(context, f"reply not readable: {type(err).__name__}: {err}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_job_seed(context))
        audit = auditor.audit(update, job.truth, context)
    return with_approximation_note(audit, update)


def with_approximation_note(audit: UpdateAudit, update: ObservedUpdate) -> UpdateAudit:
    """Every row of an update whose gradient is only estimated approximately says why, once, after
    what the engine noted: a reconstruction (or a refusal) from it means less than from a gradient."""
    if update.approximation:
        note = APPROXIMATE_NOTE.format(reason=update.approximation)
        for row in audit.rows:
            row.note = f"{row.note}; {note}" if row.note else note
    return audit


def with_rank_score(audits: Sequence[UpdateAudit], score: float | None) -> list[UpdateAudit]:
    """Every row of the round carries the round's security metric."""
    for audit in audits:
        for row in audit.rows:
            row.rank_score = score
    return list(audits)


def draw_round(
    audits: Sequence[UpdateAudit],
    partitions: Sequence[int | None],
    server_round: int,
    grid_dir: Path,
    decode: Callable[[Sequence[int]], str] | None,
) -> None:
    """The round's grid (round-NNNN.png) and, for token models, its text table (round-NNNN.md)."""
    threats = list(dict.fromkeys(row.threat for audit in audits for row in audit.rows))
    titles = [f"client {p}" for p in partitions]
    if len(threats) > 1:
        titles = [f"{t}\n{a.rows[0].threat.split()[0]}" for t, a in zip(titles, audits, strict=True)]
    title = f"round {server_round}, threat: {' / '.join(threats)}"
    save_audit_grid(audits, grid_dir / f"round-{server_round:04d}.png", title=title, column_titles=titles)
    table = text_table(audits, decode) if decode is not None else ""
    if table:  # token models: each client's true text beside what each attack recovered
        (grid_dir / f"round-{server_round:04d}.md").write_text(f"# {title}\n\n{table}")


def weights_around(
    model: ZooModel, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every parameter of `model` before and after a round: a federated one from the entries
    given (KeyError when one lacks it), one outside the federated model (a frozen pretrained
    base) the model's own value on both sides, so its observed update is exactly zero."""
    federated = set(model.federated_names())
    own = {name: p.detach() for name, p in model.named_parameters()}
    return (
        {name: before[name] if name in federated else value for name, value in own.items()},
        {name: after[name] if name in federated else value for name, value in own.items()},
    )


def _job_seed(context: AuditContext) -> int:
    key = [context.round or 0, (context.partition_id or 0) + 1]
    return int(np.random.SeedSequence(key).generate_state(1)[0])
