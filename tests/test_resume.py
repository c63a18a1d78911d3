"""`fedsim run --resume` on a damaged run folder: one line, exit 2, and the folder left as it was.

Each case damages a real run folder made the cheap way (the run store's own writers, the run's
own model weights) rather than by running a federation.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file
from typer.testing import CliRunner

from audits.engine import AUDIT_COLUMNS
from fedsim.cli import cli
from fedsim.config.run_config import RunConfig
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.store.resume_check import open_for_resume
from fedsim.store.run_store import RunStore
from fedsim.training.local import model_for

CONFIG = RunConfig(name="damaged", num_clients=2, rounds=3, local_epochs=1, audit=True, strategy="fedadam")
LAST = "checkpoints/round-0002.safetensors"
LAST_STRATEGY = "checkpoints/round-0002.strategy.safetensors"


def _server_row(server_round: int) -> dict[str, object]:
    return {"round": server_round, "stage": "server", "eval_loss": 1.0, "eval_accuracy": 0.5,
            "num_examples": 360, "seconds": 0.1}  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run of 3 rounds stopped after round 2, as the run store writes it."""
    monkeypatch.chdir(tmp_path)  # so a stray write to ./runs would show in the snapshot
    store = RunStore.create(tmp_path / "runs", CONFIG, ("accuracy",))
    weights = model_for(CONFIG).state_dict()
    for server_round in range(3):
        rows = [{"round": server_round, "partition_id": pid, "stage": "train", "train_loss": 0.5,
                 "num_examples": 600, "seconds": 0.1} for pid in range(2) if server_round > 0]  # fmt: skip
        store.append_rows([*rows, _server_row(server_round)])
        store.save_checkpoint(server_round, weights, _fedadam_state(weights, 0.5 * server_round))
    (store.path / AUDIT_FILE).write_text(",".join(AUDIT_COLUMNS) + "\n")
    return store.path


def _fedadam_state(weights: dict[str, torch.Tensor], value: float) -> dict[str, np.ndarray]:
    """FedAdam's server moments as the strategy chain checkpoints them (none before round 1)."""
    if not value:
        return {}
    return {f"aggregator/{moment}/{name}": np.full(tuple(tensor.shape), value)
            for moment in ("m_t", "v_t") for name, tensor in weights.items()}  # fmt: skip


def _snapshot(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file and folder under `root`, hidden ones included, with contents and mtimes."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def _resume(run: Path) -> str:
    """Resume through the CLI, assert it refused with one line and changed nothing; the line."""
    root = run.parent.parent
    before = _snapshot(root)
    result = CliRunner().invoke(cli, ["run", "--resume", str(run)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert _snapshot(root) == before, "a refused resume changed the folder"
    return result.output


def _rewrite_weights(run: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    weights = model_for(CONFIG).state_dict()
    change(weights)
    save_file({k: v.contiguous() for k, v in weights.items()}, run / LAST)


def test_a_sound_folder_resumes_from_its_newest_checkpoint(run_dir: Path) -> None:
    store = open_for_resume(run_dir)
    assert store.last_complete_round() == 2 and store.config == CONFIG


def test_truncated_checkpoint(run_dir: Path) -> None:
    data = (run_dir / LAST).read_bytes()
    (run_dir / LAST).write_bytes(data[: len(data) // 2])
    line = _resume(run_dir)
    assert "round-0002.safetensors is not a readable safetensors file" in line
    assert "delete checkpoints/round-0002.* to resume from round 1" in line


def test_pickled_checkpoint_is_refused_without_unpickling(run_dir: Path) -> None:
    """A torch.save file whose unpickling would create a file: refused, and the file never appears."""
    marker = run_dir.parent.parent.parent / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    torch.save({"layers.0.weight": Payload()}, run_dir / LAST)
    line = _resume(run_dir)
    assert "round-0002.safetensors is not a readable safetensors file" in line
    assert not marker.exists(), "the checkpoint was unpickled"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not a readable CSV file"),
        (b"", "is empty"),
        (b"epoch,loss\n1,0.5\n", "header lacks round, partition_id, stage, num_examples, seconds"),
        (None, "line 3: round 'abc' is not a number"),
        (None, "line 3 has 2 fields, the header 10"),
    ],
    ids=["binary", "empty", "foreign-header", "round-not-a-number", "short-row"],
)
def test_garbage_metrics(run_dir: Path, content: bytes | None, expected: str) -> None:
    metrics = run_dir / "metrics.csv"
    if content is None:
        lines = metrics.read_text().splitlines(keepends=True)
        lines[2] = "abc" + lines[2][1:] if "abc" in expected else "1,0\n"
        content = "".join(lines).encode()
    metrics.write_bytes(content)
    assert expected in _resume(run_dir)


def test_missing_metrics(run_dir: Path) -> None:
    (run_dir / "metrics.csv").unlink()
    assert "metrics.csv is missing" in _resume(run_dir)


def test_garbage_audit_log(run_dir: Path) -> None:
    (run_dir / AUDIT_FILE).write_text("round,attack\nfirst,dlg\n")
    assert f"{AUDIT_FILE} header is not round," in _resume(run_dir)


def test_missing_checkpoints_folder(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "checkpoints")
    assert "checkpoints is missing" in _resume(run_dir)


@pytest.mark.parametrize("stray", ["round-abcd.safetensors", "notes.txt", "round-0003.safetensors.bak"])
def test_stray_file_in_checkpoints(run_dir: Path, stray: str) -> None:
    shutil.copy(run_dir / LAST, run_dir / "checkpoints" / stray)
    line = _resume(run_dir)
    assert f"{stray} is not a checkpoint" in line and "move it out of" in line


def test_no_checkpoint_at_all(run_dir: Path) -> None:
    """Not a fresh start from round 0, which would write its rows a second time."""
    for checkpoint in (run_dir / "checkpoints").iterdir():
        checkpoint.unlink()
    assert "holds no model checkpoint" in _resume(run_dir)


def test_only_a_strategy_file_left(run_dir: Path) -> None:
    for checkpoint in (run_dir / "checkpoints").glob("round-????.safetensors"):
        checkpoint.unlink()
    assert "holds no model checkpoint" in _resume(run_dir)


def test_empty_config_does_not_resume_with_defaults(run_dir: Path) -> None:
    (run_dir / "config.json").write_text("{}\n")
    line = _resume(run_dir)
    assert "config.json lacks name, dataset," in line and "clients" in line


def test_config_missing_one_key(run_dir: Path) -> None:
    values = json.loads((run_dir / "config.json").read_text())
    del values["num-clients"]
    (run_dir / "config.json").write_text(json.dumps(values))
    assert "config.json lacks clients (resume never fills in defaults)" in _resume(run_dir)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ("rounds = 3", "is not valid JSON"),
    ],
)
def test_unreadable_config(run_dir: Path, text: str, expected: str) -> None:
    (run_dir / "config.json").write_text(text)
    assert expected in _resume(run_dir)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("rounds", 0, "is not a valid run config: rounds must be at least 1"),
        ("rounds", "three", "is not a valid run config: rounds in"),
        ("name", "other", "names run 'other' but the folder is 'damaged'"),
        ("model", "resnet-9000", "is not a valid run config: unknown model 'resnet-9000'"),
        ("dataset", "cifar-1000", "is not a valid run config: unknown dataset 'cifar-1000'"),
        ("audit-attacks", "telepathy", "is not a valid run config: unknown attack(s) telepathy"),
    ],
)
def test_invalid_config(run_dir: Path, key: str, value: object, expected: str) -> None:
    values = json.loads((run_dir / "config.json").read_text())
    values[key] = value
    (run_dir / "config.json").write_text(json.dumps(values))
    assert expected in _resume(run_dir)


def test_wrong_shaped_weights(run_dir: Path) -> None:
    def widen(weights: dict[str, torch.Tensor]) -> None:
        name = next(iter(weights))
        weights[name] = torch.zeros(weights[name].shape[0] + 1, *weights[name].shape[1:])

    _rewrite_weights(run_dir, widen)
    line = _resume(run_dir)
    assert "does not fit the run's mlp model" in line and "has shape" in line


def test_weights_of_another_model(run_dir: Path) -> None:
    _rewrite_weights(run_dir, lambda w: w.update({"extra.weight": torch.zeros(2)}))
    assert "unexpected extra.weight" in _resume(run_dir)


def test_nan_weights(run_dir: Path) -> None:
    def poison(weights: dict[str, torch.Tensor]) -> None:
        name = next(iter(weights))
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] = float("nan")

    _rewrite_weights(run_dir, poison)
    assert "holds non-finite values in" in _resume(run_dir)


def test_non_finite_strategy_state(run_dir: Path) -> None:
    state = _fedadam_state(model_for(CONFIG).state_dict(), 1.0)
    first = sorted(state)[0]
    state[first].flat[0] = np.inf
    save_numpy(state, run_dir / LAST_STRATEGY)
    assert f"round-0002.strategy.safetensors holds non-finite values in {first}" in _resume(run_dir)


def test_missing_or_foreign_strategy_state(run_dir: Path) -> None:
    """Without its moments FedAdam would resume fresh and drift; wrong keys would crash later."""
    (run_dir / LAST_STRATEGY).unlink()
    assert "round-0002.strategy.safetensors (missing) does not hold the fedadam strategy's state" in (
        _resume(run_dir)
    )
    save_numpy({"moment": np.zeros(4)}, run_dir / LAST_STRATEGY)
    assert "(first difference: aggregator/m_t/" in _resume(run_dir)


def test_unreadable_strategy_state(run_dir: Path) -> None:
    (run_dir / LAST_STRATEGY).write_bytes(b"\x00" * 3)
    assert "round-0002.strategy.safetensors is not a readable safetensors file" in _resume(run_dir)


def test_write_cut_short_by_a_kill_is_tolerated_and_cleaned(run_dir: Path) -> None:
    """A kill inside `atomic_write` leaves a hidden temp file and maybe the next round's strategy
    file (written before its model file): resume accepts both and removes them."""
    checkpoints = run_dir / "checkpoints"
    (checkpoints / ".round-0003.safetensors.k2j4_x").write_bytes(b"half")
    shutil.copy(run_dir / LAST_STRATEGY, checkpoints / "round-0003.strategy.safetensors")
    store = open_for_resume(run_dir)
    store.append_rows([_server_row(3)])  # a row of the interrupted round
    store.roll_back_to(store.last_complete_round() or 0)
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "round-0000.safetensors",
        "round-0001.safetensors",
        "round-0001.strategy.safetensors",
        "round-0002.safetensors",
        "round-0002.strategy.safetensors",
    ]
    assert max(int(row["round"]) for row in store.read_rows()) == 2
