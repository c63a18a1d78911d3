"""Renderers of the committed benchmark results: every `benchmarks/results/*.json` as tables, and
a compare grid's `compare.csv` as the table the report shows."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from docs.gen.markdown import cell, code, table

MAX_TEXT = 160  # characters of one value before it is cut


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def fmt(value: Any) -> str:
    """A JSON value in a cell: floats to 4 significant digits, lists of scalars joined, anything
    deeper as compact JSON, long text cut."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(_scalar(v) for v in value):
        text = ", ".join(fmt(v) for v in value)
    elif isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    else:
        text = "" if value is None else str(value)
    return cell(text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…")


def flatten(record: Mapping[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Nested dicts as dotted keys, `depth` levels down; deeper values stay whole."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and depth > 0:
            flat.update(flatten(value, f"{name}.", depth - 1))
        else:
            flat[name] = value
    return flat


def _records_table(rows: Sequence[Mapping[str, Any]]) -> str:
    flat = [flatten(row) for row in rows]
    columns = list(dict.fromkeys(k for row in flat for k in row))
    header = [code(c) if c else "" for c in columns]  # "": the keys of a dict of records
    return table(header, [[fmt(row.get(c)) for c in columns] for row in flat])


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


MAX_COLUMNS = 14  # a dict of records wider than this is shown record by record instead


def _is_keyed_records(value: Any) -> bool:
    """A dict of flat, alike records (e.g. per-model results): one table, a row per key."""
    if not (isinstance(value, dict) and len(value) > 1 and all(isinstance(v, dict) for v in value.values())):
        return False
    if any(_is_records(x) for v in value.values() for x in v.values()):
        return False
    columns = {k for v in value.values() for k in flatten(v)}
    return len(columns) <= MAX_COLUMNS


def _scalar_dict(value: Mapping[str, Any]) -> bool:
    return all(_scalar(v) or (isinstance(v, list) and all(_scalar(x) for x in v)) for v in value.values())


def render_document(document: Mapping[str, Any], level: int = 3) -> str:
    """One results document: its scalars as a key/value table, lists of records and dicts of
    records as tables, other dicts as subsections."""
    parts: list[str] = []
    scalars = [(k, v) for k, v in document.items() if not isinstance(v, dict | list) or _flat_list(v)]
    if scalars:
        parts.append(table(["key", "value"], [[code(k), fmt(v)] for k, v in scalars]))
    for key, value in document.items():
        if _is_records(value):
            parts.append(f"{'#' * level} `{key}`\n")
            parts.append(_records_table(value))
        elif _is_keyed_records(value):
            parts.append(f"{'#' * level} `{key}`\n")
            parts.append(_records_table([{"": name, **row} for name, row in value.items()]))
        elif isinstance(value, dict) and value:
            parts.append(f"{'#' * level} `{key}`\n")
            parts.append(render_document(value, level + 1) if level < 6 else fmt(value) + "\n")
        elif isinstance(value, list) and value and not _flat_list(value):
            parts.append(f"{'#' * level} `{key}`\n")
            parts.append(fmt(value) + "\n")
    return "\n".join(parts)


def _flat_list(value: Any) -> bool:
    return isinstance(value, list) and all(_scalar(v) for v in value)


def render_results(documents: Mapping[str, Mapping[str, Any]]) -> str:
    """Every results file (name -> parsed JSON), one section each, in name order."""
    parts = [
        "# Raw results\n",
        "Every JSON file under `benchmarks/results/`, rendered as it is committed (floats to 4 "
        "significant digits, long values cut). The pages beside this one read them; each script's "
        "command is on [the benchmarks page](index.md).\n",
    ]
    for name in sorted(documents):
        parts.append(f"## `{name}`\n")
        parts.append(render_document(documents[name]))
    return "\n".join(parts)


def load_results(folder: Path) -> dict[str, Any]:
    """The parsed JSON files of a results folder, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


# ---- compare grids ---------------------------------------------------------------------------------

COMPARE_SHOWN = (
    ("model", "model"), ("dataset", "dataset"), ("defence", "defence"), ("seed", "seed"),
    ("accuracy", "accuracy"), ("epsilon", "ε"), ("layerwise_score", "layer-wise score"),
    ("e2e_deficit", "e2e deficit"), ("psnr_ceiling", "PSNR ceiling (dB)"), ("best_attack", "best attack"),
    ("best_psnr", "PSNR (dB)"), ("best_ssim", "SSIM"), ("token_recall", "token recall"),
    ("linear_regions", "linear regions"), ("wall_s", "wall (s)"),
)  # fmt: skip


def _number(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return cell(text)
    return f"{value:.4g}" if not value.is_integer() or abs(value) >= 1e4 else str(int(value))


def render_compare_csv(path: Path) -> str:
    """A compare grid's `compare.csv` as a table: the columns the report's cell table shows, a
    failed cell's error in place of its results, and columns empty in every row left out."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    shown = [(key, title) for key, title in COMPARE_SHOWN if any(row.get(key) for row in rows)]
    text_columns = {"model", "dataset", "defence", "best_attack"}
    body = []
    for row in rows:
        if row.get("status") != "ok":
            first = [cell(row.get(k)) for k, _ in shown[:4]]
            rest = [
                "**failed**: " + cell(row.get("error")),
                *["" for _ in shown[5:-1]],
                _number(row["wall_s"]),
            ]
            body.append(first + rest if len(shown) > 5 else first)
            continue
        body.append([cell(row.get(k)) if k in text_columns else _number(row.get(k) or "") for k, _ in shown])
    return table([title for _, title in shown], body)
