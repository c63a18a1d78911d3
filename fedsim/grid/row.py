"""One row of compare.csv from a finished cell's run directory (and the CSV itself).

Everything a row says is read back from files the run wrote: the final server row of
metrics.csv (accuracy, the model's other metrics, ε), audit.csv (the best attack), and
compare-cell.json (the security report on the final model, the wall time). Nothing is kept
only in memory, so a resumed grid rebuilds the same row from the same folder.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedsim.grid.spec import Cell
from fedsim.store.csv_log import read_csv_rows
from fedsim.store.files import atomic_write

COMPARE_FILE = "compare.csv"
RUNS = "runs"
OK, FAILED = "ok", "failed"
COLUMNS = (
    "cell", "model", "dataset", "defence", "defence_params", "seed", "status", "error",
    "accuracy", "model_metrics", "epsilon", "layerwise_score", "e2e_deficit", "psnr_ceiling",
    "best_attack", "best_psnr", "best_ssim", "token_recall", "rouge1", "linear_regions",
    "wall_s", "run_dir",
)  # fmt: skip
EPSILON_COLUMNS = ("epsilon_central", "epsilon_client_max")
RECONSTRUCTED = "reconstructed"


def run_dir_of(compare_dir: Path, cell: Cell) -> Path:
    return compare_dir / RUNS / cell.id


def _identity(cell: Cell) -> dict[str, Any]:
    return {
        "cell": cell.id,
        "model": cell.model,
        "dataset": cell.dataset,
        "defence": cell.defence.label,
        "defence_params": cell.defence.params_json,
        "seed": cell.seed,
        "run_dir": f"{RUNS}/{cell.id}",
    }


def failed_row(cell: Cell, error: str, wall_s: float | None = None) -> dict[str, Any]:
    """A cell that did not finish: its error on one line, no measurements."""
    line = " ".join(str(error).split()) or "failed without a message"
    return {
        **dict.fromkeys(COLUMNS, None),
        **_identity(cell),
        "status": FAILED,
        "error": line,
        "wall_s": wall_s,
    }


def cell_row(cell: Cell, run_dir: Path, security: Mapping[str, Any]) -> dict[str, Any]:
    """The row of a finished cell: final metrics, ε, security numbers, best attack, wall time."""
    final = _final_server_row(run_dir)
    metrics = {
        key.removeprefix("eval_"): float(value)
        for key, value in final.items()
        if key.startswith("eval_") and key != "eval_accuracy" and value not in ("", None)
    }
    epsilons = [float(final[k]) for k in EPSILON_COLUMNS if final.get(k) not in ("", None)]
    attack = best_attack(read_csv_rows(run_dir / "audit.csv"))
    return {
        **dict.fromkeys(COLUMNS, None),
        **_identity(cell),
        "status": OK,
        "error": "",
        "accuracy": _float(final.get("eval_accuracy")),
        "model_metrics": json.dumps(metrics, sort_keys=True),
        "epsilon": max(epsilons) if epsilons else None,
        "layerwise_score": security.get("layerwise_score"),
        "e2e_deficit": security.get("e2e_deficit"),
        "psnr_ceiling": security.get("psnr_ceiling"),
        "linear_regions": security.get("linear_regions"),
        "wall_s": security.get("wall_s"),
        **attack,
    }


def best_attack(rows: Iterable[Mapping[str, str]]) -> dict[str, Any]:
    """The attack with the best mean score over its reconstructed rows: token recall for text
    attacks (rows carrying it), PSNR for the others; its mean SSIM or ROUGE-1 beside it."""
    scores: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if row.get("status") != RECONSTRUCTED:
            continue
        mine = scores.setdefault(row["attack"], {})
        for key in ("psnr", "ssim", "token_recall", "rouge1"):
            value = _float(row.get(key))
            if value is not None:
                mine.setdefault(key, []).append(value)
    empty = {"best_attack": None, "best_psnr": None, "best_ssim": None, "token_recall": None, "rouge1": None}
    means = {a: {k: sum(v) / len(v) for k, v in s.items()} for a, s in scores.items()}
    text = {a: m for a, m in means.items() if "token_recall" in m}
    if text:
        name = max(text, key=lambda a: text[a]["token_recall"])
        return {**empty, "best_attack": name, "token_recall": text[name]["token_recall"],
                "rouge1": text[name].get("rouge1")}  # fmt: skip
    images = {a: m for a, m in means.items() if "psnr" in m}
    if images:
        name = max(images, key=lambda a: images[a]["psnr"])
        return {**empty, "best_attack": name, "best_psnr": images[name]["psnr"],
                "best_ssim": images[name].get("ssim")}  # fmt: skip
    return empty


def _final_server_row(run_dir: Path) -> dict[str, str]:
    rows = [r for r in read_csv_rows(run_dir / "metrics.csv") if r.get("stage") == "server"]
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.csv'} has no server rows")
    return max(rows, key=lambda r: int(r["round"]))


def _float(value: Any) -> float | None:
    if value in ("", None):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_compare_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Rewrite compare.csv through a temp file and a rename: a reader never sees half a file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell_text(row.get(k)) for k in COLUMNS})

    atomic_write(path, write)


def read_compare_csv(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an existing compare.csv by cell id ({} when there is none). A file with other
    columns is not ours to overwrite: ValueError."""
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path} does not have compare.csv's columns")
        return {row["cell"]: row for row in reader}
