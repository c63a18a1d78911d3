"""Read and validate `compare.csv`, the grid runner's one output table, for the report.

The report is regenerated from files a user may have edited or truncated, so every column and
value is checked here once, before a figure or the page is written: the first problem found is
one `UserInputError` line naming the file, row and column.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from fedsim.errors import UserInputError
from fedsim.grid.row import COLUMNS, COMPARE_FILE, FAILED, OK

TEXT_COLUMNS = ("cell", "model", "dataset", "defence", "defence_params", "status", "error")
TEXT_COLUMNS += ("model_metrics", "best_attack", "run_dir")
NUMBER_COLUMNS = tuple(c for c in COLUMNS if c not in TEXT_COLUMNS)
JSON_COLUMNS = ("defence_params", "model_metrics")
STATUSES = (OK, FAILED)
FIX = "regenerate it with `fedsim compare`"


def read_compare(compare_dir: Path) -> pd.DataFrame:
    """compare.csv as a frame: text columns as str ('' when empty), numbers as float (NaN when
    empty), one row per cell, cells unique. Raises UserInputError naming the first problem."""
    path = Path(compare_dir) / COMPARE_FILE
    if not Path(compare_dir).is_dir():
        raise UserInputError(f"{compare_dir} is not a directory; pass the folder `fedsim compare` wrote")
    if not path.is_file():
        raise UserInputError(f"{path} not found; run `fedsim compare` first, or pass the folder it wrote")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserInputError(f"{path} is not a readable CSV ({reason}); {FIX}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise UserInputError(f"{path} lacks the column(s) {', '.join(missing)}; {FIX}")
    if frame.empty:
        raise UserInputError(f"{path} has no cells; run a grid with `fedsim compare` first")
    frame = frame[list(COLUMNS)].copy()
    for column in NUMBER_COLUMNS:
        frame[column] = [_number(path, row, column, value) for row, value in enumerate(frame[column])]
    for row, (cell, status) in enumerate(zip(frame["cell"], frame["status"], strict=True)):
        if not cell:
            raise UserInputError(f"{path} row {row + 2}: empty cell id; {FIX}")
        if status not in STATUSES:
            raise UserInputError(
                f"{path} row {row + 2}: status {status!r} is not one of {', '.join(STATUSES)}; {FIX}"
            )
        for column in JSON_COLUMNS:
            _check_json_object(path, row, column, frame.at[row, column])
    duplicated = frame["cell"][frame["cell"].duplicated()].tolist()
    if duplicated:
        raise UserInputError(f"{path}: cell {duplicated[0]!r} appears twice; {FIX}")
    return frame


def _number(path: Path, row: int, column: str, value: str) -> float:
    if value.strip() == "":
        return math.nan
    try:
        number = float(value)
    except ValueError:
        raise UserInputError(f"{path} row {row + 2}: {column} {value!r} is not a number; {FIX}") from None
    if math.isinf(number) and column != "epsilon":  # an infinite ε is "no privacy", said otherwise
        raise UserInputError(f"{path} row {row + 2}: {column} is infinite; {FIX}")
    return number


def _check_json_object(path: Path, row: int, column: str, value: str) -> None:
    if value.strip() == "":
        return
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise UserInputError(f"{path} row {row + 2}: {column} is not a JSON object; {FIX}")


def json_object(value: str) -> dict[str, object]:
    """A validated JSON-object column's value ({} when empty)."""
    return json.loads(value) if value.strip() else {}
