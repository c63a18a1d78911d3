"""The `fedsim` command is a thin layer over `fedsim.api`, with its config flags generated from the
knobs declared on RunConfig (one declaration: flag, key, help, default, checks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from attacks.registry import ATTACKS
from fedsim import api
from fedsim.cli import cli
from fedsim.config.run_config import RunConfig
from fedsim.errors import RunFailedError, UserInputError
from tests.support.runs import run_fedsim

LAUNCH_OPTIONS = {
    "--config",
    "--runs-dir",
    "--resume",
    "--stop-after",
    "--cpus",
    "--ray-address",
    "--verbose",
}


def _run_command() -> Any:
    return typer.main.get_command(cli).commands["run"]  # type: ignore[attr-defined]


def test_run_has_one_flag_per_knob_and_nothing_else() -> None:
    flags = {name for param in _run_command().params for name in param.opts}
    knob_flags = {f"--{spec.key}" for spec in RunConfig.knobs()}
    assert flags == knob_flags | LAUNCH_OPTIONS
    assert "--clients" in knob_flags and "--num-clients" not in flags
    audit = next(p for p in _run_command().params if p.name == "audit")
    assert audit.secondary_opts == ["--no-audit"]


def test_run_help_shows_every_knob_with_its_default_in_its_group() -> None:
    result = CliRunner().invoke(cli, ["run", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0
    for spec in RunConfig.knobs():
        line = next((line for line in result.output.splitlines() if f" --{spec.key} " in line), None)
        assert line is not None, f"--{spec.key} missing from --help"
        shown = "(none)" if spec.default == "" else str(spec.default)
        if spec.type is bool:
            shown = spec.key if spec.default else f"no-{spec.key}"
        assert f"[default: {shown}]" in line, line
        assert spec.help.split(" (")[0].rstrip(".") in line
    for group in {spec.group for spec in RunConfig.knobs()}:
        assert f"Config: {group}" in result.output


def _capture_run(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    captured: dict[str, Any] = {}

    def fake_run(config: RunConfig | None, **options: Any) -> api.RunResult:
        captured.update(config=config, **options)
        raise RunFailedError("stopped here for the test")

    monkeypatch.setattr(api, "run", fake_run)
    return captured


def test_flags_override_a_config_file_and_defaults_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _capture_run(monkeypatch)
    config = tmp_path / "run.toml"
    config.write_text('num-clients = 4\nrounds = 7\nseed = 5\nmodel = "cnn6"\naudit = true\n')
    args = [
        "run",
        "--config",
        str(config),
        "--seed",
        "0",
        "--learning-rate",
        "0.05",
        "--no-audit",
        "--cpus",
        "2",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and result.output.strip() == "error: stopped here for the test"
    expected = RunConfig(num_clients=4, rounds=7, seed=0, model="cnn6", learning_rate=0.05, audit=False)
    assert captured["config"] == expected
    assert captured["cpus"] == 2 and captured["runs_dir"] == Path("runs") and captured["resume"] is None
    assert callable(captured["on_round"])


def test_failed_run_prints_one_line_and_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    _capture_run(monkeypatch)
    result = CliRunner().invoke(cli, ["run", "--rounds", "2"])
    assert result.exit_code == 1
    assert result.output.splitlines() == ["error: stopped here for the test"]


def test_attacks_lists_each_attack_with_what_it_does_and_works_on() -> None:
    result = CliRunner().invoke(cli, ["attacks"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == 2 * len(ATTACKS)
    for name, entry in ATTACKS.items():
        at = next(i for i, line in enumerate(lines) if line.split()[0] == name)
        assert lines[at].endswith(entry.description) and entry.description.strip()
        assert lines[at + 1].strip() == f"works on: {entry.works_on}"


@pytest.mark.parametrize("flag", ["--dataset", "--data"])
def test_audit_takes_dataset_like_run(flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captured: dict[str, Any] = {}

    def fake_audit(**options: Any) -> None:
        captured.update(options)
        raise UserInputError("stopped here for the test")

    monkeypatch.setattr(api, "audit", fake_audit)
    result = CliRunner().invoke(
        cli, ["audit", flag, "digits", "--model", "mlp", "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 2 and result.output.strip() == "error: stopped here for the test"
    assert captured["dataset"] == "digits" and captured["out"] == tmp_path / "a"
    help_text = CliRunner().invoke(cli, ["audit", "--help"], terminal_width=200).output
    assert "--dataset" in help_text and "--data " not in help_text


def test_typos_in_flags_and_values_get_one_line_and_exit_2(tmp_path: Path) -> None:
    """Click's own usage box would be several lines; the console script keeps the one-line rule."""
    for args, message in [
        (["run", "--modle", "mlp"], "error: No such option '--modle'"),
        (["run", "--learning-rate", "abc"], "error: Invalid value for '--learning-rate': 'abc'"),
        (["frobnicate"], "error: No such command 'frobnicate'"),
    ]:
        result = run_fedsim(args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(message), result.stderr
        assert "--help`" in result.stderr
    assert not (tmp_path / "runs").exists()
