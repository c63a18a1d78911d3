"""`fedsim run --resume`: the run folder it reads, made the cheap way (the run store's own
writers, the run's own model weights) rather than by running a federation.

The damaged folders it refuses (one line, exit 2, the folder left as it was) are cases of
tests/fedsim/test_bad_input_corpus.py, built on `make_run`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedsim.plan.resume import open_for_resume
from tests.support.saved_runs import CONFIG, LAST_STRATEGY, make_run, server_row


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # so a stray write to ./runs would show
    return make_run(tmp_path / "runs")


def test_a_sound_folder_resumes_from_its_newest_checkpoint(run_dir: Path) -> None:
    store = open_for_resume(run_dir)
    assert store.last_complete_round() == 2 and store.config == CONFIG


def test_write_cut_short_by_a_kill_is_tolerated_and_cleaned(run_dir: Path) -> None:
    """A kill inside `atomic_write` leaves a hidden temp file and maybe the next round's strategy
    file (written before its model file): resume accepts both and removes them."""
    checkpoints = run_dir / "checkpoints"
    (checkpoints / ".round-0003.safetensors.k2j4_x").write_bytes(b"half")
    shutil.copy(run_dir / LAST_STRATEGY, checkpoints / "round-0003.strategy.safetensors")
    store = open_for_resume(run_dir)
    store.append_rows([server_row(3)])  # a row of the interrupted round
    store.roll_back_to(store.last_complete_round() or 0)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "round-0000.safetensors",
        "round-0001.safetensors",
        "round-0001.strategy.safetensors",
        "round-0002.safetensors",
        "round-0002.strategy.safetensors",
    ]
    assert max(int(row["round"]) for row in store.read_rows()) == 2
