"""The compare report as one self-contained HTML page: summary, figures, reconstructions, all cells.

Everything the page shows is inside the file (PNGs as base64 data URIs, the style inline, no
script, no font, no link out), so it opens offline and can be mailed as one attachment. Every
piece of text from the CSV or a run directory goes through `html.escape`.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path

import pandas as pd

from fedsim.grid.analysis import LEAKAGE_LABEL, Choice, PredictionError

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
.summary { background: #f4f4f4; border: 1px solid #ccc; padding: 0.6em 1.2em; }
.summary h2 { margin-top: 0.3em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #e8e8e8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fbe3e3; }
.flag { font-weight: bold; color: #900; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; }
del { color: #777; }
"""
CELL_COLUMNS = (
    ("cell", "cell", None), ("model", "architecture", None), ("dataset", "dataset", None),
    ("defence", "defence", None), ("seed", "seed", "{:.0f}"), ("accuracy", "accuracy", "{:.3f}"),
    ("epsilon", "ε", "{:.3g}"), ("layerwise_score", "layer-wise score", "{:.0f}"),
    ("e2e_deficit", "e2e deficit", "{:.0f}"), ("psnr_ceiling", "PSNR ceiling (dB)", "{:.1f}"),
    ("best_attack", "best attack", None), ("best_psnr", "best PSNR (dB)", "{:.1f}"),
    ("best_ssim", "best SSIM", "{:.3f}"), ("token_recall", "token recall", "{:.3f}"),
    ("rouge1", "ROUGE-1", "{:.3f}"), ("linear_regions", "linear regions", "{:.0f}"),
    ("wall_s", "wall (s)", "{:.1f}"),
)  # fmt: skip


@dataclass(frozen=True)
class Figure:
    """A PNG to embed, with its caption."""

    path: Path
    caption: str


@dataclass(frozen=True)
class Recon:
    """The most or least leaky cell of a modality and what its run wrote to show it."""

    role: str  # "most leaky" / "least leaky"
    modality: str
    cell: pd.Series
    image: Path | None = None  # images: the reconstruction grid
    text_table: str = ""  # text: the round's Markdown table of true vs recovered text
    note: str = ""  # why there is nothing to show


def page(
    title: str,
    choices: list[Choice],
    error: PredictionError,
    figures: list[Figure],
    recons: list[Recon],
    cells: pd.DataFrame,
) -> str:
    """The whole page as a string."""
    failed = cells[cells["status"] != "ok"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        summary(choices, error, len(cells), len(failed)),
        "<h2>Figures</h2>",
        *(figure(f) for f in figures),
        "<h2>Most and least leaky cells</h2>",
        *(recon(r) for r in recons),
        "" if recons else "<p>No ok cell has a measured leakage: nothing to show.</p>",
        "<h2>All cells</h2>",
        cell_table(cells),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def summary(choices: list[Choice], error: PredictionError, total: int, failed: int) -> str:
    """The plain-language answer at the top of the page."""
    items = [f"<li>{total} cells, {total - failed} ran, {failed} failed (flagged in the table below).</li>"]
    for choice in choices:
        items.append(f"<li>{_choice_sentence(choice)}</li>")
    if error.pairs == 0:
        items.append("<li>No image cell has both a predicted PSNR ceiling and a measured PSNR, "
                     "so the metric's prediction could not be checked.</li>")  # fmt: skip
    else:
        rho = (
            f"Spearman's ρ between them is {error.spearman:.2f}"
            if error.spearman is not None
            else "Spearman's ρ is not reported (it needs 3 or more cells with different values)"
        )
        items.append(
            f"<li>How good was the prediction? Over {error.pairs} image cell(s), the predicted PSNR "
            f"ceiling was a median {error.median_abs_db:.1f} dB away from the best attack's measured "
            f"PSNR; {rho}.</li>"
        )
    return f'<div class="summary"><h2>Summary</h2><ul>{"".join(items)}</ul></div>'


def _choice_sentence(choice: Choice) -> str:
    unit = LEAKAGE_LABEL[choice.modality]
    if choice.target_accuracy is None:
        return f"{escape(choice.modality.capitalize())}: no cell reported an accuracy; no setting is chosen."
    how = (
        f"the best accuracy ({choice.best_accuracy:.3f}) minus 5 points"
        if choice.target_default
        else "as requested"
    )
    target = f"target accuracy {choice.target_accuracy:.3f} ({how})"
    if choice.chosen is None:
        reason = (
            "no architecture × defence reaches it"
            if choice.reaching == 0
            else f"{choice.reaching} reach it but none has a measured leakage"
        )
        return f"{escape(choice.modality.capitalize())}, {target}: {reason}."
    row = choice.chosen
    value = f"{row['leakage']:.1f} dB" if choice.modality == "images" else f"{row['leakage']:.3f}"
    return (
        f"{escape(choice.modality.capitalize())}, {target}: <strong>{escape(str(row['label']))}</strong> "
        f"reaches accuracy {row['accuracy']:.3f} with the least measured leakage, {escape(unit)} "
        f"{value} (mean over {int(row['seeds'])} seed(s); {choice.reaching_measured} of the "
        f"{choice.reaching} setting(s) at the target had a measured leakage)."
    )


def figure(fig: Figure) -> str:
    return (
        f'<figure><img src="{data_uri(fig.path)}" alt="{escape(fig.caption)}">'
        f"<figcaption>{escape(fig.caption)}</figcaption></figure>"
    )


def data_uri(path: Path) -> str:
    """A PNG as a base64 data URI (the page carries its images)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def recon(item: Recon) -> str:
    cell = item.cell
    leak = cell["best_psnr"] if item.modality == "images" else cell["token_recall"]
    unit = " dB" if item.modality == "images" else ""
    head = (
        f"<h3>{escape(item.role.capitalize())} ({escape(item.modality)}): {escape(str(cell['cell']))}</h3>"
        f"<p>{escape(str(cell['model']))} on {escape(str(cell['dataset']))}, defence "
        f"{escape(str(cell['defence']))}, seed {_fmt(cell['seed'], '{:.0f}')}; best attack "
        f"{escape(str(cell['best_attack']) or '-')}: {escape(LEAKAGE_LABEL[item.modality])} "
        f"{_fmt(leak, '{:.3g}')}{unit}.</p>"
    )
    if item.image is not None:
        body = figure(Figure(item.image, f"{item.role} cell {cell['cell']}: the run's reconstruction grid"))
    elif item.text_table:
        body = markdown(item.text_table)
    else:
        body = f"<p>{escape(item.note or 'its run wrote no reconstruction')}</p>"
    return head + body


def markdown(text: str) -> str:
    """The audit's Markdown (pipe tables with **added** and ~~missed~~ words, other lines as
    paragraphs) as HTML; escaped first, so nothing in it can become markup."""
    out, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|"):
            table.append(line.strip())
            continue
        if table:
            out.append(_pipe_table(table))
            table = []
        if line.strip():
            out.append(f"<p>{_inline(line.strip().lstrip('#').strip())}</p>")
    return "\n".join(out)


def _pipe_table(lines: list[str]) -> str:
    cells = (re.split(r"(?<!\\)\|", line.strip("|")) for line in lines)
    rows = [[c.strip().replace("\\|", "|") for c in row] for row in cells]
    rows = [r for r in rows if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]  # the --- rule
    if not rows:
        return ""
    head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _inline(text: str) -> str:
    safe = escape(text)
    safe = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", safe)
    return re.sub(r"~~(.+?)~~", r"<del>\1</del>", safe)


def cell_table(cells: pd.DataFrame) -> str:
    """Every cell of compare.csv, failed ones flagged with their error."""
    head = "".join(f"<th>{escape(name)}</th>" for _, name, _ in CELL_COLUMNS) + "<th>status</th>"
    rows = []
    for _, row in cells.iterrows():
        tds = []
        for column, _, spec in CELL_COLUMNS:
            value = row[column]
            shown = f'<td class="num">{_fmt(value, spec)}</td>' if spec else f"<td>{escape(str(value))}</td>"
            tds.append(shown)
        if row["status"] == "ok":
            tds.append("<td>ok</td>")
            rows.append(f"<tr>{''.join(tds)}</tr>")
        else:
            error = escape(str(row["error"]) or "no error recorded")
            tds.append(f'<td><span class="flag">FAILED</span>: {error}</td>')
            rows.append(f'<tr class="failed">{"".join(tds)}</tr>')
    return f'<table class="cells"><tr>{head}</tr>{"".join(rows)}</table>'


def _fmt(value: object, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return escape(spec.format(value))
