"""The per-update picture of a text audit: true text beside each attack's recovery, differences marked.

Where image audits draw a grid of reconstructions, a token model's audit writes a Markdown table:
one line per (update, attack) with the true text and the recovered text. Words of the recovery
that the truth lacks are **bold**; words of the truth the recovery missed are ~~struck~~ in the
true column. A bag of tokens (an attack that recovers no order, its row has no exact-sequence rate) is
shown as a set beside the true set, by token id.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher

import numpy as np

from audits.scoring.engine import UpdateAudit
from audits.similarity.text import PADDING_ID, Decode, strip


def _words(ids: Sequence[int], decode: Decode) -> list[str]:
    return [decode([t]) for t in ids]


def marked_pair(true: list[str], recovered: list[str]) -> tuple[str, str]:
    """The two texts with their differences marked (difflib's alignment of the word lists)."""
    left, right = [], []
    for op, i1, i2, j1, j2 in SequenceMatcher(a=true, b=recovered, autojunk=False).get_opcodes():
        if op == "equal":
            left += true[i1:i2]
            right += recovered[j1:j2]
            continue
        left += [f"~~{w}~~" for w in true[i1:i2]]
        right += [f"**{w}**" for w in recovered[j1:j2]]
    return " ".join(left), " ".join(right)


def marked_bag(true: list[int], recovered: list[int], decode: Decode) -> tuple[str, str]:
    """Sets of words, sorted: true words not recovered struck, recovered words not true bold."""
    true_set, rec_set = set(true), set(recovered)
    left = [decode([t]) if t in rec_set else f"~~{decode([t])}~~" for t in sorted(true_set)]
    right = [decode([t]) if t in true_set else f"**{decode([t])}**" for t in sorted(rec_set)]
    return " ".join(left), " ".join(right)


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "(empty)"


def text_table(updates: Sequence[UpdateAudit], decode: Decode, padding_id: int = PADDING_ID) -> str:
    """Markdown: per update with truth and per attack that recovered tokens, each true sequence
    beside the recovered sequence at the same index (padding and unresolved positions dropped)."""
    lines = ["| sample | attack | sequence | true | recovered |", "|---|---|---|---|---|"]
    for update in updates:
        if update.true_tokens is None or not update.tokens or not update.rows:
            continue
        sample = update.rows[0].sample if update.rows[0].sample is not None else update.rows[0].partition_id
        true_rows = [strip(row, padding_id) for row in np.asarray(update.true_tokens)]
        ordered = {row.attack: row.exact_sequence is not None for row in update.rows}
        for attack, recovered in update.tokens.items():
            rec_rows = [strip(row, padding_id) for row in np.asarray(recovered)]
            if not ordered.get(attack, False):
                left, right = marked_bag([t for row in true_rows for t in row], rec_rows[0], decode)
                lines.append(f"| {sample} | {attack} | set | {_cell(left)} | {_cell(right)} |")
                continue
            for k, true in enumerate(true_rows):
                rec = rec_rows[k] if k < len(rec_rows) else []
                left, right = marked_pair(_words(true, decode), _words(rec, decode))
                lines.append(f"| {sample} | {attack} | {k} | {_cell(left)} | {_cell(right)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""
