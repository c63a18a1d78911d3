"""Bad input: one line naming the problem and the fix, exit code 2, no run directory.

These tables are part of the bad-input corpus (tests/fedsim/test_bad_input_corpus.py prints them in
its README table); file, checkpoint and run-folder cases live there."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsim.cli import cli
from tests.support.cli_cases import AUDIT_CASES, CASES, CONFIG_VALUE_CASES
from tests.support.runs import run_fedsim


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_run_input(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "--runs-dir", str(tmp_path / "runs"), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_real_process_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """The same as a user sees it: stderr has exactly the error line, no traceback."""
    result = run_fedsim(["run", "--rounds", "0"], cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "error: rounds must be in [1, 100000] (got 0); pass --rounds in that range"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("suffix", "text", "message"), CONFIG_VALUE_CASES)
def test_bad_values_in_a_config_file(suffix: str, text: str, message: str, tmp_path: Path) -> None:
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    result = CliRunner().invoke(cli, ["run", "--config", str(config), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "runs").exists()


def test_clients_key_in_a_config_file(tmp_path: Path) -> None:
    """The README's TOML uses `clients`, the flag's name, as well as `num-clients`."""
    from fedsim.config.run_config import RunConfig

    config = tmp_path / "run.toml"
    config.write_text("clients = 4\nrounds = 2\n")
    assert RunConfig.from_file(config).num_clients == 4


@pytest.mark.parametrize(("args", "message"), AUDIT_CASES, ids=[" ".join(c[0]) for c in AUDIT_CASES])
def test_bad_audit_input(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["audit", "--model", "mlp", "--dataset", "digits", *args,
                                      "--out", str(tmp_path / "audit")])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "audit").exists()
