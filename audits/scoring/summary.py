"""What an audit reports: one summary per attack, and the original-vs-reconstruction grid.

Both the federated `audit.csv` and `fedsim audit`'s are lists of `AuditRow`s, so one summary and
one grid serve both.
"""

from __future__ import annotations

import csv
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: files only, the caller's backend untouched

from audits.scoring.engine import DECLINED, FAILED, NOISE_ONLY, RECONSTRUCTED, AuditRow, UpdateAudit

TRUTH_ROW = "true sample"


def read_audit_rows(path: Path) -> list[AuditRow]:
    with open(path, newline="") as handle:
        return [AuditRow.from_csv(record) for record in csv.DictReader(handle)]


def summarise_audit(source: Path | str | Iterable[AuditRow]) -> list[dict[str, Any]]:
    """Per attack, in order of first appearance: how many updates it saw, reconstructed, declined
    and failed on, and how many were noise only (an empty DP-SGD batch); PSNR mean/max, SSIM and
    label score over the scored ones; mean seconds per reconstruction; and the first reason it
    could not run (or could not be scored)."""
    rows = read_audit_rows(Path(source)) if isinstance(source, (str, Path)) else list(source)
    summary = []
    for attack in dict.fromkeys(r.attack for r in rows):
        mine = [r for r in rows if r.attack == attack]
        ran = [r for r in mine if r.status == RECONSTRUCTED]
        psnrs = [r.psnr for r in ran if r.psnr is not None]
        problems = [r.note for r in mine if r.status != RECONSTRUCTED and r.note]
        notes = problems or [r.note for r in mine if r.note]
        summary.append(
            {
                "attack": attack,
                "updates": len(mine),
                "reconstructed": len(ran),
                "declined": sum(r.status == DECLINED for r in mine),
                "failed": sum(r.status == FAILED for r in mine),
                "noise_only": sum(r.status == NOISE_ONLY for r in mine),
                "scored": len(psnrs),
                "mean_psnr": _mean(psnrs),
                "max_psnr": max(psnrs) if psnrs else None,
                "mean_ssim": _mean([r.ssim for r in ran if r.ssim is not None]),
                "label_score": _mean([r.label_score for r in ran if r.label_score is not None]),
                "mean_seconds": _mean([r.seconds for r in ran]),
                "note": notes[0] if notes else "",
            }
        )
    return summary


def _mean(values: list[float]) -> float | None:
    """None (JSON null, an empty CSV cell) rather than NaN when nothing was measured."""
    return float(np.mean(values)) if values else None


def _to_display(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] to something imshow draws: grey for one channel, RGB for three."""
    image = np.clip(image, 0.0, 1.0)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def short_reason(note: str, width: int = 22, max_lines: int = 5) -> str:
    """The gist of a decline note for a grid cell: the problem before the '; fix' part, wrapped."""
    gist = note.split("; ")[0].strip() or "no reason given"
    return textwrap.fill(gist, width=width, max_lines=max_lines, placeholder=" …")


def _caption(row: AuditRow, psnr: float | None) -> str:
    """Under a reconstruction: its own PSNR against the true sample above it, and the labels."""
    if psnr is None:  # no true sample to compare with; what leaked is still worth showing
        labels = row.recovered_labels.split()
        recovered = f"\nlabel{'s' if len(labels) > 1 else ''} {' '.join(labels[:4])}" if labels else ""
        return f"not scored{recovered}{' …' if len(labels) > 4 else ''}"
    quality = f"PSNR {psnr:.1f} dB"
    if row.label_score is None:
        return quality
    recovered = len(row.recovered_labels.split())
    if recovered == 1:
        return f"{quality}\nlabel {'right' if row.label_score == 1 else 'wrong'}"
    return f"{quality}\nlabels {round(row.label_score * recovered)}/{recovered} right"


def _blank(ax: Axes, text: str, size: tuple[int, int]) -> None:
    """A grey cell the size of an image (so the grid stays aligned) with `text` in it."""
    ax.imshow(np.full(size, 0.94), cmap="gray", vmin=0, vmax=1)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=6, color="#333333", transform=ax.transAxes)


def _image(ax: Axes, image: np.ndarray, size: tuple[int, int]) -> None:
    if image.ndim == 3 and image.shape[0] in (1, 3):
        ax.imshow(_to_display(image), cmap="gray", vmin=0, vmax=1)
    else:  # token or feature samples: no picture to draw
        _blank(ax, f"not an image\n{tuple(image.shape)}", size)


def save_audit_grid(
    updates: Sequence[UpdateAudit], path: Path, title: str, column_titles: Sequence[str]
) -> None:
    """One column per update: its true sample on top, one row per attack below, each reconstruction
    captioned with its own PSNR, or the short reason the attack declined or failed."""
    attacks = list(dict.fromkeys(r.attack for u in updates for r in u.rows))
    shown = [u.original for u in updates] + [i for u in updates for i in u.images.values()]
    size = next((tuple(i.shape[-2:]) for i in shown if i is not None and i.ndim == 3), (32, 32))
    cols, rows = len(updates), 1 + len(attacks)
    fig = Figure(figsize=(1.7 * cols + 1.3, 1.75 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    for c, update in enumerate(updates):
        by_attack = {r.attack: r for r in update.rows}
        top = axes[0][c]
        top.set_title(column_titles[c], fontsize=8)
        if update.original is None:
            _blank(top, update.original_note, size)
        else:
            _image(top, update.original, size)
        for r, attack in enumerate(attacks, start=1):
            ax, row = axes[r][c], by_attack.get(attack)
            if row is None:
                _blank(ax, "not run", size)
            elif row.status == RECONSTRUCTED:
                _image(ax, update.images[attack], size)
                ax.set_xlabel(_caption(row, update.image_psnr.get(attack)), fontsize=7)
            else:
                _blank(ax, short_reason(row.note), size)
                ax.set_xlabel(row.status, fontsize=7)
    for r, name in enumerate([TRUTH_ROW, *attacks]):
        axes[r][0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(textwrap.fill(title, width=int(13 * fig.get_figwidth())), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
