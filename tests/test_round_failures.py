"""A round where clients fail must not pass for progress."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedsim.federation.server_app import FederationError, require_training


@dataclass
class FakeReply:
    """Just what `require_training` reads of a Flower reply Message."""

    reason: str | None = None

    def has_error(self) -> bool:
        return self.reason is not None

    @property
    def error(self) -> SimpleNamespace:
        return SimpleNamespace(reason=self.reason)


def test_a_round_where_every_client_failed_stops_the_federation() -> None:
    wrapped = "<class 'ClientAppException'>:<'Exception occurred. Message: Invalid momentum value: -0.5'>"
    with pytest.raises(FederationError) as caught:
        require_training(4, [FakeReply(wrapped)] * 3)
    assert str(caught.value) == (
        "round 4: all 3 clients failed to train (first error: Invalid momentum value: -0.5)"
    )


def test_partial_failures_warn_and_go_on(caplog: pytest.LogCaptureFixture) -> None:
    require_training(2, [FakeReply(), FakeReply("boom"), FakeReply()])
    assert "round 2: 1 of 3 clients failed to train" in caplog.text
    caplog.clear()
    require_training(3, [FakeReply(), FakeReply()])
    assert caplog.text == ""


FAILING_RUN = """
import sys
from pathlib import Path
from fedsim.config.run_config import RunConfig
from fedsim.federation.server_app import FederationPlan
from fedsim.federation.simulation import SimulationError, simulate
from fedsim.store.run_store import RunStore
from fedsim.training.local import metric_names

# Negative momentum is refused by validation; built directly, it makes every client's SGD raise.
config = RunConfig(name="broken", num_clients=2, rounds=2, local_epochs=1, momentum=-0.5)
plan = FederationPlan(config, RunStore.create(Path(sys.argv[1]), config, metric_names(config)))
try:
    simulate(plan, cpus=2)
except SimulationError as err:
    print(err)
    sys.exit(1)
"""


@pytest.mark.slow
def test_failed_clients_end_the_simulation_with_their_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FAILING_RUN, str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert result.stdout.startswith(
        "the simulation stopped after round 0 of 2 (round 1: all 2 clients failed to train "
        "(first error: Invalid momentum value: -0.5)); rerun with --verbose"
    )
    checkpoints = sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir())
    assert checkpoints == ["round-0000.safetensors"], "a failed round must not be checkpointed"
