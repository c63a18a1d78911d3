"""The bad-input corpus's rows, read from the corpus itself (`tests/fedsim/test_bad_input_corpus.py`,
whose `table_rows()` also serves `python -m tests.fedsim.test_bad_input_corpus`)."""

from __future__ import annotations

import importlib


def bad_input_rows() -> list[tuple[str, str, str]]:
    """(id, input, message fragment) of every case, in the corpus's order."""
    corpus = importlib.import_module("tests.fedsim.test_bad_input_corpus")
    return corpus.table_rows()
