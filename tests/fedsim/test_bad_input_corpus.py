"""The bad-input corpus: malformed flags, config files, names, checkpoints and run folders, each
through the real `fedsim` entry point. Every case must give exit code 2, exactly one line on
stderr that names the problem, and leave the working folder byte-for-byte as it was (no new run
folder, a refused resume changes nothing, a pickled checkpoint is never unpickled).

`python -m tests.fedsim.test_bad_input_corpus` prints the README table of every case: these and the
parametrized ones of tests/fedsim/test_cli_errors.py. Node-config cases live in
tests/fedsim/federation/test_node_config.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from fedsim.cli import main
from fedsim.store.audit_folder import AUDIT_FILE
from fedsim.training.local import model_for
from tests.support.ray_cluster import closed_port
from tests.support.runs import run_fedsim
from tests.support.saved_runs import CONFIG, LAST, LAST_STRATEGY, fedadam_state, make_run

Setup = Callable[[Path, pytest.MonkeyPatch], None]
RUN = "{tmp}/runs/damaged"  # the run folder `make_run` writes
MARKER = "unpickled"  # the file a pickle payload would create when loaded
AUDIT = ("audit", "--model", "mlp", "--dataset", "digits", "--out", "{tmp}/audit")


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # after `fedsim`; {tmp} is the case's working folder
    message: str  # a fragment of the one error line
    setup: Setup | None = None
    input: str = ""  # what is wrong, for the README table (default: the args)
    subprocess: bool = False  # also run it as a real `python -m fedsim` process


# ---- file builders -------------------------------------------------------------------------


def write(name: str, content: bytes | str) -> Setup:
    def setup(tmp: Path, _: pytest.MonkeyPatch) -> None:
        data = content.encode() if isinstance(content, str) else content
        (tmp / name).write_bytes(data)

    return setup


def mkdir(name: str) -> Setup:
    return lambda tmp, _: (tmp / name).mkdir()


def pickle_payload(name: str) -> Setup:
    """A torch.save (pickle) file whose unpickling would create `{tmp}/unpickled`."""

    def setup(tmp: Path, _: pytest.MonkeyPatch) -> None:
        marker = str(tmp / MARKER)

        class Payload:
            def __reduce__(self) -> tuple[object, tuple[str, str]]:
                return (open, (marker, "w"))

        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"layers.0.weight": Payload()}, tmp / name)

    return setup


def mlp_weights(
    change: Callable[[dict[str, torch.Tensor]], None] = lambda w: None,
) -> dict[str, torch.Tensor]:
    """The run's (and the audit's) mlp-on-digits weights, changed in place by `change`."""
    weights = {k: v.clone() for k, v in model_for(CONFIG).state_dict().items()}
    change(weights)
    return {k: v.contiguous() for k, v in weights.items()}


def weights_file(name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Setup:
    def setup(tmp: Path, _: pytest.MonkeyPatch) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(mlp_weights(change), tmp / name)

    return setup


def truncated_weights(name: str) -> Setup:
    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        weights_file(name, lambda w: None)(tmp, mp)
        data = (tmp / name).read_bytes()
        (tmp / name).write_bytes(data[: len(data) // 2])

    return setup


def widen(weights: dict[str, torch.Tensor]) -> None:
    name = next(iter(weights))
    weights[name] = torch.zeros(weights[name].shape[0] + 1, *weights[name].shape[1:])


def poison(weights: dict[str, torch.Tensor]) -> None:
    name = next(iter(weights))
    weights[name].view(-1)[0] = float("nan")


def rename(weights: dict[str, torch.Tensor]) -> None:
    weights["extra.weight"] = torch.zeros(2)


def other_model(weights: dict[str, torch.Tensor]) -> None:
    """A real checkpoint of another model: the mlp with 64 hidden units, not 128."""
    weights.clear()
    weights.update(model_for(CONFIG.replace(model_options="hidden=64")).state_dict())


def damaged_run(damage: Callable[[Path], None]) -> Setup:
    """A run stopped after round 2 (see tests/fedsim/plan/test_resume.py), then `damage(run_dir)`."""

    def setup(tmp: Path, _: pytest.MonkeyPatch) -> None:
        damage(make_run(tmp / "runs"))

    return setup


def set_config(key: str, value: object) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        values = json.loads((run / "config.json").read_text())
        if value is None:
            del values[key]
        else:
            values[key] = value
        (run / "config.json").write_text(json.dumps(values))

    return damage


def put(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / relative).write_bytes(content.encode() if isinstance(content, str) else content)

    return damage


def remove(relative: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        target = run / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return damage


def edit_metrics(line: int, text: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
        lines[line] = text(lines[line]) if callable(text) else text
        (run / "metrics.csv").write_text("".join(lines))

    return damage


def last_checkpoint(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    return lambda run: save_file(mlp_weights(change), run / LAST)


def strategy_state(state: dict[str, np.ndarray]) -> Callable[[Path], None]:
    return lambda run: save_numpy(state, run / LAST_STRATEGY)


def poisoned_strategy_state() -> dict[str, np.ndarray]:
    state = fedadam_state(mlp_weights(), 1.0)
    state[sorted(state)[0]].flat[0] = np.inf
    return state


def no_ray_cluster(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as it is with no Ray cluster: no RAY_ADDRESS, no `ray start` file in Ray's
    temp folder, no raylet process (other sessions' simulations run raylets on this machine)."""
    import ray._private.services as services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp / "raytmp"))
    monkeypatch.setattr(services, "find_gcs_addresses", frozenset)


def stale_ray_cluster(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `ray start` that has since stopped: its address file names a port nobody answers at."""
    no_ray_cluster(tmp, monkeypatch)
    (tmp / "raytmp" / "ray").mkdir(parents=True)
    (tmp / "raytmp" / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed_port()}\n")


# ---- the corpus ----------------------------------------------------------------------------

CORPUS: list[Case] = [
    # names
    Case("unknown-defence", ("run", "--defence", "nosuch"), "unknown client transformation(s) nosuch"),
    Case("unknown-command", ("train",), "No such command 'train'"),
    Case("unknown-flag", ("run", "--roudns", "3"), "No such option '--roudns'"),
    Case("audit-unknown-model", ("audit", "--model", "resnet"), "unknown model 'resnet'; choose one of"),
    Case("audit-unknown-dataset", ("audit", "--dataset", "cifar10"), "unknown dataset 'cifar10'"),
    Case("audit-unknown-attack", (*AUDIT, "--attacks", "telepathy"), "unknown attack(s) telepathy"),
    Case("audit-unknown-head", (*AUDIT, "--head", "tanh"), "unknown head 'tanh'"),
    Case("audit-unknown-flag", ("audit", "--wieghts", "w.safetensors"), "No such option '--wieghts'"),
    # numbers
    Case("clients-negative", ("run", "--clients", "-2"), "clients must be at least 1 (got -2)"),
    Case("rounds-not-a-number", ("run", "--rounds", "abc"), "'abc' is not a valid integer"),
    Case("rounds-huge", ("run", "--rounds", "1000000000000"), "rounds must be in [1, 100000]"),
    Case("local-epochs-huge", ("run", "--local-epochs", "1000000000"), "local-epochs must be in [1, 10000]"),
    Case("batch-size-zero", ("run", "--batch-size", "0"), "batch-size must be at least 1 (got 0)"),
    Case("audit-samples-zero", (*AUDIT, "--samples", "0"), "--samples must be at least 1 (got 0)"),
    Case("audit-image-size-negative", (*AUDIT, "--image-size", "-1"), "image-size must be at least 0"),
    Case("audit-seed-negative", (*AUDIT, "--seed", "-1"), "seed must be in [0, 4294967295] (got -1)"),
    Case(
        "audit-gradient-noise-text",
        ("audit", "--gradient-noise", "lots"),
        "'lots' is not a valid float",
    ),
    # strings
    Case("name-too-long", ("run", "--name", "x" * 300), "is 300 bytes long, more than a folder name may be"),
    Case("model-options-no-key", ("run", "--model-options", "=3"), "model option '=3' is not key=value"),
    Case("audit-model-options-garbage", (*AUDIT, "--model-options", "garbage"), "'garbage' is not key=value"),
    Case("model-options-nul", ("run", "--model-options", "\x00"), "contains the control character '\\x00'"),
    # --ray-address
    Case(
        "ray-address-auto-no-cluster",
        ("run", "--ray-address", "auto"),
        "--ray-address auto found no Ray cluster on this machine",
        setup=no_ray_cluster,
        input="--ray-address auto, no Ray cluster running (used to hang for minutes)",
    ),
    Case(
        "ray-address-auto-stale",
        ("run", "--ray-address", "auto"),
        "no Ray cluster answers at auto (127.0.0.1:",
        setup=stale_ray_cluster,
        input="--ray-address auto, ray_current_cluster of a stopped cluster",
    ),
    Case("ray-address-empty", ("run", "--ray-address", ""), "--ray-address is empty; pass a non-empty value"),
    Case(
        "ray-address-garbage", ("run", "--ray-address", "garbage"), "--ray-address 'garbage' is not host:port"
    ),
    Case(
        "ray-address-no-port", ("run", "--ray-address", "ray://"), "--ray-address 'ray://' is not host:port"
    ),
    # config files
    Case("config-missing", ("run", "--config", "{tmp}/nope.toml"), "cannot read config {tmp}/nope.toml"),
    Case(
        "config-syntax",
        ("run", "--config", "{tmp}/c.toml"),
        "cannot read config {tmp}/c.toml: ",
        setup=write("c.toml", "rounds = = 3\n"),
        input="TOML `rounds = = 3`",
    ),
    Case(
        "config-empty",
        ("run", "--config", "{tmp}/c.toml"),
        "config {tmp}/c.toml is empty",
        setup=write("c.toml", b""),
        input="empty config file",
        subprocess=True,
    ),
    Case(
        "config-garbage-bytes",
        ("run", "--config", "{tmp}/c.toml"),
        "'utf-8' codec can't decode byte 0x80",
        setup=write("c.toml", bytes(range(256))),
        input="bytes 0x00..0xff as config",
    ),
    Case(
        "config-utf16",
        ("run", "--config", "{tmp}/c.toml"),
        "'utf-8' codec can't decode byte 0xff",
        setup=write("c.toml", "rounds = 3\n".encode("utf-16")),
        input="UTF-16 TOML",
    ),
    Case(
        "config-binary-json",
        ("run", "--config", "{tmp}/c.json"),
        "cannot read config {tmp}/c.json",
        setup=write("c.json", b"\x89PNG\r\n\x1a\n\x00"),
        input="PNG bytes as .json",
    ),
    Case(
        "config-is-a-folder",
        ("run", "--config", "{tmp}/d"),
        "Is a directory",
        setup=mkdir("d"),
        input="--config a folder",
    ),
    Case(
        "config-yaml",
        ("run", "--config", "{tmp}/c.yaml"),
        "Expected '=' after a key",
        setup=write("c.yaml", "rounds: 3\n"),
        input="YAML `rounds: 3`",
    ),
    Case(
        "config-json-list",
        ("run", "--config", "{tmp}/c.json"),
        "is not a table of keys",
        setup=write("c.json", "[1, 2]"),
        input="JSON `[1, 2]`",
    ),
    Case(
        "config-unknown-key",
        ("run", "--config", "{tmp}/c.toml"),
        "unknown key 'modle'",
        setup=write("c.toml", 'modle = "mlp"\n'),
        input='TOML `modle = "mlp"`',
    ),
    Case(
        "config-unknown-table",
        ("run", "--config", "{tmp}/c.toml"),
        "unknown key 'tool'",
        setup=write("c.toml", "[tool.x]\na = 1\n"),
        input="TOML table `[tool.x]`",
    ),
    Case(
        "config-string-for-int",
        ("run", "--config", "{tmp}/c.toml"),
        "rounds in {tmp}/c.toml must be int",
        setup=write("c.toml", 'rounds = "three"\n'),
        input='TOML `rounds = "three"`',
    ),
    Case(
        "config-list-for-int",
        ("run", "--config", "{tmp}/c.toml"),
        "clients in {tmp}/c.toml must be int",
        setup=write("c.toml", "clients = [1, 2]\n"),
        input="TOML `clients = [1, 2]`",
    ),
    Case(
        "config-bool-for-float",
        ("run", "--config", "{tmp}/c.toml"),
        "learning-rate in {tmp}/c.toml must be float",
        setup=write("c.toml", "learning-rate = true\n"),
        input="TOML `learning-rate = true`",
    ),
    Case(
        "config-int-for-str",
        ("run", "--config", "{tmp}/c.toml"),
        "name in {tmp}/c.toml must be str",
        setup=write("c.toml", "name = 5\n"),
        input="TOML `name = 5`",
    ),
    Case(
        "config-huge-int",
        ("run", "--config", "{tmp}/c.toml"),
        "rounds must be in [1, 100000]",
        setup=write("c.toml", "rounds = 99999999999999999999999\n"),
        input="TOML `rounds = 10^23`",
    ),
    # folders and files in each other's place
    Case(
        "runs-dir-is-a-file",
        ("run", "--runs-dir", "{tmp}/runs"),
        "cannot create a run directory in {tmp}/runs",
        setup=write("runs", "not a folder"),
        input="--runs-dir a file",
    ),
    Case(
        "run-name-taken",
        ("run", "--name", "damaged"),
        "run directory runs/damaged already exists",
        setup=damaged_run(lambda run: None),
        input="--name of an existing run",
    ),
    Case(
        "resume-a-file",
        ("run", "--resume", "{tmp}/f"),
        "is not a fedsim run directory",
        setup=write("f", "x"),
        input="--resume a file",
    ),
    Case("resume-missing", ("run", "--resume", "{tmp}/nope"), "{tmp}/nope is not a fedsim run directory"),
    Case(
        "resume-no-run",
        ("run", "--resume", "{tmp}"),
        "is not a fedsim run directory (no config.json)",
        input="--resume a folder that holds no run",
    ),
    Case(
        "resume-with-run-flags",
        ("run", "--resume", RUN, "--rounds", "5"),
        "drop the other run flags",
        setup=damaged_run(lambda run: None),
    ),
    # --weights of `fedsim audit`
    Case("weights-missing", (*AUDIT, "--weights", "{tmp}/nope.safetensors"), "No such file or directory"),
    Case(
        "weights-folder",
        (*AUDIT, "--weights", "{tmp}/d"),
        "weights {tmp}/d is a folder",
        setup=mkdir("d"),
        input="--weights a folder",
    ),
    Case(
        "weights-empty",
        (*AUDIT, "--weights", "{tmp}/w.safetensors"),
        "header too small",
        setup=write("w.safetensors", b""),
        input="empty .safetensors",
    ),
    Case(
        "weights-truncated",
        (*AUDIT, "--weights", "{tmp}/w.safetensors"),
        "cannot read weights",
        setup=truncated_weights("w.safetensors"),
        input="first half of a .safetensors",
    ),
    Case(
        "weights-pickle-safetensors",
        (*AUDIT, "--weights", "{tmp}/w.safetensors"),
        "cannot read weights",
        setup=pickle_payload("w.safetensors"),
        input="pickle payload renamed .safetensors",
        subprocess=True,
    ),
    Case(
        "weights-pickle-pt",
        (*AUDIT, "--weights", "{tmp}/w.pt"),
        "cannot read weights {tmp}/w.pt",
        setup=pickle_payload("w.pt"),
        input="pickle payload (torch.save) as .pt",
    ),
    Case(
        "weights-wrong-names",
        (*AUDIT, "--weights", "{tmp}/w.safetensors"),
        "unexpected extra.weight",
        setup=weights_file("w.safetensors", rename),
        input="an extra tensor name",
    ),
    Case(
        "weights-wrong-shapes",
        (*AUDIT, "--weights", "{tmp}/w.safetensors"),
        "has shape [129, 64], the model",
        setup=weights_file("w.safetensors", widen),
        input="one tensor a row too wide",
    ),
    Case(
        "weights-other-model",
        (*AUDIT, "--weights", "{tmp}/w.safetensors"),
        "do not fit this model",
        setup=weights_file("w.safetensors", other_model),
        input="checkpoint of mlp hidden=64",
    ),
    Case(
        "weights-nan",
        (*AUDIT, "--weights", "{tmp}/w.safetensors"),
        "hold non-finite values in",
        setup=weights_file("w.safetensors", poison),
        input="a NaN in the first tensor",
    ),
    Case(
        "audit-out-is-a-file",
        (*AUDIT[:-1], "{tmp}/f"),
        "output folder {tmp}/f already exists",
        setup=write("f", "x"),
        input="--out an existing file",
    ),
    # damaged run folders for --resume (the run of tests/fedsim/plan/test_resume.py, stopped after round 2)
    Case(
        "resume-config-missing",
        ("run", "--resume", RUN),
        "is not a fedsim run directory (no config.json)",
        setup=damaged_run(remove("config.json")),
        input="run folder without config.json",
    ),
    Case(
        "resume-config-folder",
        ("run", "--resume", RUN),
        "is not a fedsim run directory",
        setup=damaged_run(lambda run: (remove("config.json")(run), (run / "config.json").mkdir())),
        input="config.json is a folder",
    ),
    Case(
        "resume-config-empty-object",
        ("run", "--resume", RUN),
        "config.json lacks name, dataset,",
        setup=damaged_run(put("config.json", "{}\n")),
        input="config.json `{}`",
    ),
    Case(
        "resume-config-key-missing",
        ("run", "--resume", RUN),
        "config.json lacks clients",
        setup=damaged_run(set_config("num-clients", None)),
        input="config.json without num-clients",
    ),
    Case(
        "resume-config-empty",
        ("run", "--resume", RUN),
        "is not valid JSON",
        setup=damaged_run(put("config.json", "")),
        input="empty config.json",
    ),
    Case(
        "resume-config-list",
        ("run", "--resume", RUN),
        "is not a JSON object",
        setup=damaged_run(put("config.json", "[1, 2]")),
        input="config.json `[1, 2]`",
    ),
    Case(
        "resume-config-toml",
        ("run", "--resume", RUN),
        "is not valid JSON",
        setup=damaged_run(put("config.json", "rounds = 3")),
        input="TOML in config.json",
    ),
    Case(
        "resume-config-garbage",
        ("run", "--resume", RUN),
        "is not valid JSON",
        setup=damaged_run(put("config.json", bytes(range(256)))),
        input="garbage bytes in config.json",
    ),
    Case(
        "resume-config-rounds-0",
        ("run", "--resume", RUN),
        "rounds must be in [1, 100000]",
        setup=damaged_run(set_config("rounds", 0)),
        input="config.json rounds 0",
    ),
    Case(
        "resume-config-rounds-text",
        ("run", "--resume", RUN),
        "is not a valid run config: rounds in",
        setup=damaged_run(set_config("rounds", "three")),
        input='config.json rounds "three"',
    ),
    Case(
        "resume-config-other-name",
        ("run", "--resume", RUN),
        "names run 'other' but the folder is 'damaged'",
        setup=damaged_run(set_config("name", "other")),
        input='config.json name "other"',
    ),
    Case(
        "resume-config-unknown-model",
        ("run", "--resume", RUN),
        "unknown model 'resnet-9000'",
        setup=damaged_run(set_config("model", "resnet-9000")),
        input="config.json unknown model",
    ),
    Case(
        "resume-config-unknown-dataset",
        ("run", "--resume", RUN),
        "unknown dataset 'cifar-1000'",
        setup=damaged_run(set_config("dataset", "cifar-1000")),
        input="config.json unknown dataset",
    ),
    Case(
        "resume-config-unknown-attack",
        ("run", "--resume", RUN),
        "unknown attack(s) telepathy",
        setup=damaged_run(set_config("audit-attacks", "telepathy")),
        input="config.json unknown attack",
    ),
    Case(
        "resume-checkpoint-truncated",
        ("run", "--resume", RUN),
        "round-0002.safetensors is not a readable safetensors file",
        setup=damaged_run(lambda run: (run / LAST).write_bytes((run / LAST).read_bytes()[:100])),
        input="last checkpoint truncated",
    ),
    Case(
        "resume-checkpoint-pickle",
        ("run", "--resume", RUN),
        "round-0002.safetensors is not a readable safetensors file",
        setup=lambda tmp, mp: (
            damaged_run(lambda run: None)(tmp, mp),
            pickle_payload(f"runs/damaged/{LAST}")(tmp, mp),
        ),
        input="last checkpoint a pickle payload",
        subprocess=True,
    ),
    Case(
        "resume-checkpoint-wrong-shape",
        ("run", "--resume", RUN),
        "does not fit the run's mlp model",
        setup=damaged_run(last_checkpoint(widen)),
        input="last checkpoint: a tensor a row too wide",
    ),
    Case(
        "resume-checkpoint-extra-tensor",
        ("run", "--resume", RUN),
        "unexpected extra.weight",
        setup=damaged_run(last_checkpoint(rename)),
        input="last checkpoint: an extra tensor",
    ),
    Case(
        "resume-checkpoint-other-model",
        ("run", "--resume", RUN),
        "does not fit the run's mlp model",
        setup=damaged_run(last_checkpoint(other_model)),
        input="last checkpoint of mlp hidden=64",
    ),
    Case(
        "resume-checkpoint-nan",
        ("run", "--resume", RUN),
        "holds non-finite values in",
        setup=damaged_run(last_checkpoint(poison)),
        input="last checkpoint: a NaN",
    ),
    Case(
        "resume-checkpoint-symlink-loop",
        ("run", "--resume", RUN),
        "round-0002.safetensors",
        setup=damaged_run(lambda run: (remove(LAST)(run), (run / LAST).symlink_to(run / LAST))),
        input="last checkpoint a symlink to itself",
    ),
    Case(
        "resume-checkpoints-missing",
        ("run", "--resume", RUN),
        "checkpoints is missing",
        setup=damaged_run(remove("checkpoints")),
        input="no checkpoints/ folder",
    ),
    Case(
        "resume-checkpoints-a-file",
        ("run", "--resume", RUN),
        "checkpoints",
        setup=damaged_run(lambda run: (remove("checkpoints")(run), (run / "checkpoints").write_text("x"))),
        input="checkpoints/ is a file",
    ),
    Case(
        "resume-no-checkpoint",
        ("run", "--resume", RUN),
        "holds no model checkpoint",
        setup=damaged_run(lambda run: [p.unlink() for p in (run / "checkpoints").iterdir()]),
        input="checkpoints/ empty",
    ),
    Case(
        "resume-only-strategy-file",
        ("run", "--resume", RUN),
        "holds no model checkpoint",
        setup=damaged_run(
            lambda run: [p.unlink() for p in (run / "checkpoints").glob("round-????.safetensors")]
        ),
        input="only strategy files in checkpoints/",
    ),
    Case(
        "resume-stray-file",
        ("run", "--resume", RUN),
        "notes.txt is not a checkpoint",
        setup=damaged_run(put("checkpoints/notes.txt", "x")),
        input="checkpoints/notes.txt",
    ),
    Case(
        "resume-stray-bad-round",
        ("run", "--resume", RUN),
        "round-abcd.safetensors is not a checkpoint",
        setup=damaged_run(lambda run: shutil.copy(run / LAST, run / "checkpoints/round-abcd.safetensors")),
        input="checkpoints/round-abcd.safetensors",
    ),
    Case(
        "resume-stray-backup",
        ("run", "--resume", RUN),
        "round-0003.safetensors.bak is not a checkpoint",
        setup=damaged_run(
            lambda run: shutil.copy(run / LAST, run / "checkpoints/round-0003.safetensors.bak")
        ),
        input="checkpoints/round-0003.safetensors.bak",
    ),
    Case(
        "resume-strategy-missing",
        ("run", "--resume", RUN),
        "(missing) does not hold the fedadam strategy's state",
        setup=damaged_run(remove(LAST_STRATEGY)),
        input="fedadam run without its strategy state",
    ),
    Case(
        "resume-strategy-foreign",
        ("run", "--resume", RUN),
        "(first difference: aggregator/m_t/",
        setup=damaged_run(strategy_state({"moment": np.zeros(4)})),
        input="strategy state of other keys",
    ),
    Case(
        "resume-strategy-inf",
        ("run", "--resume", RUN),
        "strategy.safetensors holds non-finite values in",
        setup=damaged_run(lambda run: strategy_state(poisoned_strategy_state())(run)),
        input="strategy state with an inf",
    ),
    Case(
        "resume-strategy-garbage",
        ("run", "--resume", RUN),
        "strategy.safetensors is not a readable safetensors",
        setup=damaged_run(put(LAST_STRATEGY, b"\x00" * 3)),
        input="strategy state of 3 NUL bytes",
    ),
    Case(
        "resume-metrics-missing",
        ("run", "--resume", RUN),
        "metrics.csv is missing",
        setup=damaged_run(remove("metrics.csv")),
        input="no metrics.csv",
    ),
    Case(
        "resume-metrics-binary",
        ("run", "--resume", RUN),
        "is not a readable CSV file",
        setup=damaged_run(put("metrics.csv", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")),
        input="PNG bytes as metrics.csv",
    ),
    Case(
        "resume-metrics-empty",
        ("run", "--resume", RUN),
        "is empty",
        setup=damaged_run(put("metrics.csv", b"")),
        input="empty metrics.csv",
    ),
    Case(
        "resume-metrics-foreign-header",
        ("run", "--resume", RUN),
        "header lacks round, partition_id, stage, num_examples, seconds",
        setup=damaged_run(put("metrics.csv", "epoch,loss\n1,0.5\n")),
        input="metrics.csv of another tool",
    ),
    Case(
        "resume-metrics-round-text",
        ("run", "--resume", RUN),
        "line 3: round 'abc' is not a number",
        setup=damaged_run(edit_metrics(2, lambda line: "abc" + line[1:])),
        input="metrics.csv round `abc`",
    ),
    Case(
        "resume-metrics-short-row",
        ("run", "--resume", RUN),
        "line 3 has 2 fields, the header 10",
        setup=damaged_run(edit_metrics(2, "1,0\n")),
        input="metrics.csv row of 2 fields",
    ),
    Case(
        "resume-audit-log-garbage",
        ("run", "--resume", RUN),
        f"{AUDIT_FILE} header is not round,",
        setup=damaged_run(put(AUDIT_FILE, "round,attack\nfirst,dlg\n")),
        input="audit.csv of other columns",
    ),
]


# ---- the checks ----------------------------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones, links as links: a loop is not followed) with a hash
    of its bytes; folders and links by kind and target."""
    entries: dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                entries[key] = "folder"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def fill(args: tuple[str, ...], tmp: Path) -> list[str]:
    return [arg.replace("{tmp}", str(tmp)) for arg in args]


def run_main(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """`fedsim ARGS` through the console script's `main`, in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fedsim", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main()
    return stopped.value.code, capsys.readouterr().err


def check_refusal(case: Case, tmp: Path, code: object, stderr: str, before: dict[str, str]) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert case.message.replace("{tmp}", str(tmp)) in lines[0], stderr
    assert tree_digest(tmp) == before, "a refused command wrote or changed files"
    assert not (tmp / MARKER).exists(), "a pickle payload was unpickled"


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_bad_input(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default runs/ and audit folders would land here
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    before = tree_digest(tmp_path)
    started = time.monotonic()
    code, stderr = run_main(fill(case.args, tmp_path), capsys, monkeypatch)
    check_refusal(case, tmp_path, code, stderr, before)
    assert time.monotonic() - started < 60, "a refusal must not wait"


SUBPROCESS_CASES = [case for case in CORPUS if case.subprocess]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[case.id for case in SUBPROCESS_CASES])
def test_bad_input_in_a_real_process(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a user sees it: stderr holds only the error line, no traceback, nothing written."""
    if case.setup is not None:
        case.setup(tmp_path, monkeypatch)
    before = tree_digest(tmp_path)
    result = run_fedsim(fill(case.args, tmp_path), cwd=tmp_path, timeout=120)
    check_refusal(case, tmp_path, result.returncode, result.stderr, before)


def test_the_pickle_payload_would_run_if_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The marker checks above can fail: loading the payload with pickle does create the file."""
    pickle_payload("w.pt")(tmp_path, monkeypatch)
    torch.load(tmp_path / "w.pt", weights_only=False)
    assert (tmp_path / MARKER).exists()


def test_the_tree_digest_sees_a_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    damaged_run(lambda run: None)(tmp_path, monkeypatch)
    before = tree_digest(tmp_path)
    metrics = tmp_path / "runs" / "damaged" / "metrics.csv"
    metrics.write_bytes(metrics.read_bytes().replace(b"0.5", b"0.6", 1))
    assert tree_digest(tmp_path) != before


# ---- the README table ----------------------------------------------------------------------


def table_rows() -> list[tuple[str, str, str]]:
    """(id, input, message) of every bad-input case: this corpus, then the CLI cases
    (`tests.support.cli_cases`)."""
    from tests.support import cli_cases

    audit = " ".join(AUDIT)  # every audit case attacks the same model, into {tmp}/audit
    rows = [
        (c.id, c.input or " ".join(c.args).replace(audit, "audit [mlp, digits]"), c.message) for c in CORPUS
    ]
    rows += [
        (f"cli-errors-{i}", "run " + " ".join(args), message)
        for i, (args, message) in enumerate(cli_cases.CASES, 1)
    ]
    rows += [
        (f"cli-errors-audit-{i}", "audit " + " ".join(args), message)
        for i, (args, message) in enumerate(cli_cases.AUDIT_CASES, 1)
    ]
    rows += [
        (f"cli-errors-config-{i}", f"config{suffix} `{text.strip()}`", message)
        for i, (suffix, text, message) in enumerate(cli_cases.CONFIG_VALUE_CASES, 1)
    ]
    return rows


def markdown_table() -> str:
    def cell(text: str) -> str:
        shown = text.encode("unicode_escape").decode() if any(ord(c) < 32 for c in text) else text
        shown = shown if len(shown) <= 70 else shown[:67] + "..."
        return shown.replace("|", "\\|").replace("`", "'")

    lines = ["| # | case | input | message contains |", "|---|---|---|---|"]
    lines += [
        f"| {i} | {cid} | `{cell(what)}` | {cell(message)} |"
        for i, (cid, what, message) in enumerate(table_rows(), 1)
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
