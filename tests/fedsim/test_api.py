"""The public Python API: `fedsim.run` and `fedsim.audit` return DataFrames and paths; bad input
raises UserInputError before anything is written; each simulation runs in a child process, so a
notebook can call `fedsim.run` again and again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fedsim
from fedsim import api, launch
from fedsim.config.run_config import RunConfig
from fedsim.errors import RunFailedError, UserInputError
from fedsim.store.run_store import RunStore
from models import natural_dataset
from tests.support.optional import require_fortunes
from tests.support.runs import ROOT


def test_import_is_light_and_the_api_is_reachable_from_the_package() -> None:
    code = (
        "import sys, fedsim.errors, fedsim\n"
        "assert 'flwr' not in sys.modules and 'torch' not in sys.modules, 'import pulled in the stack'\n"
        "assert fedsim.run.__module__ == 'fedsim.launch' and fedsim.audit.__module__ == 'fedsim.api'\n"
        "assert fedsim.compare.__module__ == 'fedsim.api'\n"
        "assert {'run', 'audit', 'RunResult', 'AuditResult', 'RunConfig'} <= set(dir(fedsim))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = fedsim.nothing


def test_audit_of_mlp_on_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = torch.random.get_rng_state()
    result = fedsim.audit(
        model="mlp", dataset="digits", samples=2, attacks=["layerwise", "analytic-fc"], out=tmp_path / "a"
    )
    assert torch.equal(torch.random.get_rng_state(), before), "the caller's torch RNG was reseeded"
    security = result.security
    assert isinstance(security, pd.DataFrame) and list(security["kind"]) == ["Linear"] * 3
    assert list(security["deficit"]) == [0, 0, 0] and result.security_report.score == 0
    assert list(result.rows["attack"]) == ["layerwise", "analytic-fc"] * 2
    chosen = result.settings["samples"]  # test-split indices, drawn with the seed
    assert list(result.rows["sample"]) == [chosen[0], chosen[0], chosen[1], chosen[1]]
    summary = result.summary.set_index("attack")
    assert summary.loc["analytic-fc", "mean_psnr"] >= 60  # exact for an FC layer with bias
    assert summary.loc["layerwise", "updates"] == 2
    assert result.inputs.shape == (2, 1, 8, 8) and len(result.labels) == 2
    assert [image.shape for image in result.reconstructions["analytic-fc"]] == [(1, 8, 8)] * 2
    assert result.path == tmp_path / "a"
    assert [p.name for p in result.files] == ["audit.csv", "reconstructions.png", "report.json"]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert (
        report["settings"]["dataset"] == "digits"
        and report["settings"]["samples"] == result.settings["samples"]
    )

    again = fedsim.audit(model="mlp", dataset="digits", samples=2, attacks="layerwise,analytic-fc")
    assert again.path is None and again.files == (), "out=None keeps the audit in memory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    pd.testing.assert_frame_equal(
        again.rows.drop(columns="seconds"), result.rows.drop(columns="seconds"), check_exact=True
    )
    assert all(np.array_equal(a, b) for a, b in zip(again.inputs, result.inputs, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "seed must be in [0, 4294967295] (got -1)"),
        ({"seed": 2**32}, "seed must be in [0, 4294967295]"),
        ({"model": "mlp\x00"}, "model 'mlp\\x00' contains the control character '\\x00'"),
        ({"dataset": "dig\nits"}, "dataset 'dig\\nits' contains the control character '\\n'"),
        ({"attacks": []}, "unknown attack(s) (none given)"),
        ({"samples": 0}, "--samples must be at least 1 (got 0)"),
        ({"image_size": -4}, "image-size must be at least 0 (got -4)"),
        ({"weights": "w\x00.safetensors"}, "weights 'w\\x00.safetensors' contains the control character"),
        ({"head": "hinge"}, "hinge"),
    ],
)
def test_audit_bad_input(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    settings = {"model": "mlp", "dataset": "digits", "samples": 1, "out": tmp_path / "x", **kwargs}
    with pytest.raises(UserInputError) as caught:
        fedsim.audit(**settings)
    assert message in str(caught.value) and "\n" not in str(caught.value).replace("\\n", "")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        ({"learning-rate": float("inf")}, {}, "learning-rate must be a finite number (got inf)"),
        ({"alpha": float("nan")}, {}, "alpha must be a finite number (got nan)"),
        (RunConfig(momentum=float("inf")), {}, "momentum must be a finite number (got inf)"),
        (RunConfig(seed=-3), {}, "seed must be in [0, 4294967295] (got -3)"),
        ({"name": "a\x00b"}, {}, "name 'a\\x00b' contains the control character '\\x00'"),
        ({"modle": "mlp"}, {}, "unknown key 'modle' in config"),
        ({"rounds": "3"}, {}, "rounds in config must be int"),
        ({}, {"runs_dir": "ru\x00ns"}, "--runs-dir 'ru\\x00ns' contains the control character"),
        ({}, {"stop_after": 0}, "--stop-after must be at least 1"),
        ({}, {"cpus": 0}, "--cpus must be at least 1"),
        ({}, {"resume": "somewhere"}, "resume continues a run with its saved config"),
    ],
)
def test_run_bad_input_raises_before_writing(
    config: object, options: dict[str, object], message: str, tmp_path: Path
) -> None:
    options = {"runs_dir": tmp_path / "runs", **options}
    with pytest.raises(UserInputError) as caught:
        fedsim.run(config, **options)
    assert message in str(caught.value)
    assert not (tmp_path / "runs").exists()


def test_float_knobs_given_as_ints_are_floats() -> None:
    """RunConfig(learning_rate=1) is RunConfig(learning_rate=1.0): same record, same config.json."""
    config = RunConfig(learning_rate=1, alpha=2)
    assert isinstance(config.learning_rate, float) and config.to_dict()["alpha"] == 2.0
    config.validate()


def _store_with_rounds(tmp_path: Path, checkpoints: int, server_rounds: list[int]) -> RunStore:
    store = RunStore.create(tmp_path, RunConfig(name="follow"), ("accuracy",))
    rows = [{"round": r, "partition_id": 0, "stage": "train", "train_loss": 1.0} for r in server_rounds]
    rows += [
        {"round": r, "stage": "server", "eval_loss": 2.0 - r, "eval_accuracy": r / 10} for r in server_rounds
    ]
    store.append_rows(rows)
    for server_round in range(checkpoints):
        store.save_checkpoint(server_round, {"w": torch.zeros(1)}, {})
    return store


def test_rounds_are_reported_once_complete_and_in_order(tmp_path: Path) -> None:
    """A round counts once its checkpoint exists: rows of an interrupted round (a resume is about
    to drop them) and a row still being appended are never reported."""
    store = _store_with_rounds(tmp_path, checkpoints=2, server_rounds=[2, 0, 1])
    with open(store.metrics_path, "a") as handle:
        handle.write("3,,server,,1.5")  # half-written: no newline yet
    assert list(launch._new_rounds(store, -1)) == [
        (0, {"eval_loss": 2.0, "eval_accuracy": 0.0}),
        (1, {"eval_loss": 1.0, "eval_accuracy": 0.1}),
    ]
    assert list(launch._new_rounds(store, 1)) == []
    store.save_checkpoint(2, {"w": torch.zeros(1)}, {})
    assert [r for r, _ in launch._new_rounds(store, 1)] == [2]


def test_round_zero_waits_for_its_row(tmp_path: Path) -> None:
    """Round 0's checkpoint is written before its server row; it is reported when the row lands."""
    store = _store_with_rounds(tmp_path, checkpoints=1, server_rounds=[])
    assert list(launch._new_rounds(store, -1)) == []
    store.append_rows([{"round": 0, "stage": "server", "eval_loss": 2.3}])
    assert list(launch._new_rounds(store, -1)) == [(0, {"eval_loss": 2.3})]


@pytest.mark.parametrize(
    ("report", "returncode", "error", "message"),
    [
        ({"kind": "input", "message": "bad folder; fix it"}, 2, UserInputError, "bad folder; fix it"),
        ({"kind": "run", "message": "the simulation stopped"}, 1, RunFailedError, "the simulation stopped"),
        (
            {"kind": "crash", "message": "KeyError: 'x'", "details": "Traceback"},
            1,
            RunFailedError,
            "KeyError",
        ),
        (None, -9, RunFailedError, "ended with signal SIGKILL before reporting"),
        (None, 3, RunFailedError, "ended with exit code 3 before reporting"),
    ],
)
def test_child_outcomes_become_exceptions(
    report: dict[str, str] | None, returncode: int, error: type, message: str, tmp_path: Path
) -> None:
    report_path = tmp_path / "report.json"
    if report is not None:
        report_path.write_text(json.dumps(report))
    (tmp_path / "simulation.log").write_text("ray said things\n")
    failure = launch._failure(returncode, report_path, tmp_path / "simulation.log")
    assert type(failure) is error and message in str(failure)
    if report is None:
        assert failure.details == "ray said things\n"


def test_worker_reports_bad_input_as_one_line(tmp_path: Path) -> None:
    """The child process's own errors travel back as a report, not a traceback."""
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "fedsim._worker", str(tmp_path / "missing"), "--report", str(report),
         "--parent", str(os.getpid())],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    outcome = json.loads(report.read_text())
    assert outcome["kind"] == "input" and "is not a fedsim run directory" in outcome["message"]


def test_run_with_a_config_of_the_wrong_kind_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="config must be a RunConfig, a mapping of config keys"):
        fedsim.run(42, runs_dir=tmp_path / "runs")  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()


def test_fedsim_warnings_reach_the_user_without_verbose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rejected update must not pass silently; Flower's and Ray's chatter stays hidden."""
    log = tmp_path / "simulation.log"
    log.write_text("INFO flwr: starting\nwarning: round 1: rejected the update of client 0: x\nhalf a li")
    offset = launch._forward_log(log, 0, everything=False)
    assert capsys.readouterr().err == "warning: round 1: rejected the update of client 0: x\n"
    with open(log, "a") as handle:
        handle.write("ne\n")
    launch._forward_log(log, offset, everything=True)
    assert capsys.readouterr().err == "half a line\n"


def test_a_run_result_carries_its_privacy_ledger(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, RunConfig(name="private", defence="dp-sgd"), ("accuracy",))
    assert api.RunResult.load(store.path).privacy is None
    from fedsim import wire
    from fedsim.strategy.privacy_ledger import PrivacyBook
    from fedsim.training.transforms import PrivacySpend

    book = PrivacyBook(store.path, 1e-5)
    spend = PrivacySpend("dp-sgd", 0.4, 1e-5, 1.1, 1.0, 0.05, 20, "poisson")
    book.append(book.client_rows(1, 3, wire.encode_privacy(("dp-sgd(z=1.1,C=1)",), (spend,))))
    ledger = api.RunResult.load(store.path).privacy
    assert list(ledger[["round", "partition_id", "mechanism"]].itertuples(index=False, name=None)) == [
        (1, 3, "dp-sgd")
    ]
    assert ledger["epsilon"].iloc[0] == pytest.approx(book.client_epsilon(3))


def test_audit_without_a_dataset_uses_the_familys_natural_one(tmp_path: Path) -> None:
    """`fedsim audit --model X` alone attacks the data the family is meant for."""
    result = fedsim.audit(model="mlp", samples=1, attacks="analytic-fc")
    assert result.settings["dataset"] == natural_dataset("mlp") == "digits"
    assert result.inputs.shape == (1, 1, 8, 8)


def test_audit_refuses_a_pretrained_model_on_another_vocabulary_in_one_line() -> None:
    require_fortunes()
    with pytest.raises(UserInputError, match=r"reads only minilm token ids.*use --dataset fortunes-minilm"):
        fedsim.audit(model="minilm", dataset="fortunes", samples=1)
