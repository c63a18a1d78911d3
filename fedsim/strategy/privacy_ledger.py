"""The server's privacy ledger: what every defence spent, per client and round, in `privacy.csv`.

Two mechanisms spend budget, with different guarantees, and the ledger keeps them apart:

- `dp-sgd` (Opacus, on the client): sample-level DP of that client's data. Each client reports
  the round's (z, sample rate q, steps) and the ε its own Opacus accountant computed; the ledger
  composes a client's rounds with Opacus's `RDPAccountant` over that history, so `epsilon` is
  the client's cumulative spend and `epsilon_round` the round's as reported. The history is the
  ledger's checkpointed state, so a resumed run reports what a straight one does.
- central DP (Flower's wrappers, see `fedsim.strategy.central_dp`): client-level DP of the
  global model, one row per round with Flower's `RdpAccountant` value.

`sampling` says what each ε assumes: `poisson` (Opacus's analysis holds), `shuffle` (batches were
shuffled, not Poisson-sampled: the ε is what Opacus reports for Poisson sampling at the same
rate, not a proven bound), `no-amplification` (central DP), `adaptive` (no accountant).

The ledger sits after reply validation: it records the replies the server accepted. A reply
whose privacy record cannot be read is logged as a warning and left out of the ledger.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy
from opacus.accountants import RDPAccountant

from fedsim import wire
from fedsim.store.csv_log import CsvLog
from fedsim.strategy.base import StrategyWrapper
from fedsim.strategy.central_dp import CentralPrivacy
from fedsim.strategy.ordering import partition_of
from fedsim.training.transforms import PrivacySpend

log = logging.getLogger(__name__)

PRIVACY_FILE = "privacy.csv"
PRIVACY_COLUMNS = (
    "round",
    "partition_id",
    "mechanism",
    "epsilon",
    "epsilon_round",
    "delta",
    "noise_multiplier",
    "clip_norm",
    "sample_rate",
    "steps",
    "sampling",
)
# One history event per (client, round): round, partition id, z, q, steps.
HISTORY_FIELDS = 5


class PrivacyBook:
    """The ledger itself, apart from any strategy: `privacy.csv` and each client's DP-SGD
    history. The Message-API chain keeps it in `PrivacyLedger`; a `--secagg` run, whose clients
    report their spend in clear beside the masked update, keeps it directly."""

    STATE_KEY = "history"

    def __init__(self, output_dir: Path, delta: float) -> None:
        self.log = CsvLog(output_dir / PRIVACY_FILE, PRIVACY_COLUMNS)
        self.delta = delta
        self.history: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
        self._events: list[tuple[int, int, float, float, int]] = []
        self._epsilon: dict[int, float] = {}  # each client's cumulative ε, updated per spend

    def client_rows(
        self, server_round: int, partition: int, record: Mapping[str, Any]
    ) -> list[dict[str, object]]:
        """Rows for the spends in one client's privacy record (`wire.encode_privacy`); a record
        that cannot be read is logged as a warning and left out."""
        try:
            _, spends = wire.decode_privacy(record)
            return [self._record(server_round, partition, spend) for spend in spends]
        except (KeyError, TypeError, ValueError) as err:
            log.warning(
                "round %d: client %s sent an unreadable privacy record (%s)", server_round, partition, err
            )
            return []

    def _record(self, server_round: int, partition: int, spend: PrivacySpend) -> dict[str, object]:
        event = (float(spend.noise_multiplier), float(spend.sample_rate), int(spend.steps))
        self._add(server_round, partition, event)
        return {
            "round": server_round,
            "partition_id": partition,
            "mechanism": spend.mechanism,
            "epsilon": self._epsilon[partition],
            "epsilon_round": float(spend.epsilon),
            "delta": self.delta,
            "noise_multiplier": event[0],
            "clip_norm": float(spend.clip_norm),
            "sample_rate": event[1],
            "steps": event[2],
            "sampling": spend.sampling,
        }

    def append(self, rows: Iterable[Mapping[str, object]]) -> None:
        self.log.append(rows)

    def _add(self, server_round: int, partition: int, event: tuple[float, float, int]) -> None:
        self.history[partition].append(event)
        self._events.append((server_round, partition, *event))
        self._epsilon[partition] = self.client_epsilon(partition)

    def client_epsilon(self, partition: int) -> float:
        """The client's cumulative DP-SGD ε at the run's δ (Opacus RDP over its rounds)."""
        accountant = RDPAccountant()
        accountant.history = list(self.history[partition])
        return float(accountant.get_epsilon(self.delta))

    def max_client_epsilon(self) -> float | None:
        """The largest cumulative DP-SGD ε of any client so far (None: no DP-SGD spend yet)."""
        return max(self._epsilon.values(), default=None)

    def drop_rounds_after(self, last_round: int) -> None:
        """On resume: forget the rows of an interrupted round (the history comes from the checkpoint)."""
        self.log.drop_rows_after(last_round)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {self.STATE_KEY: np.array(self._events, dtype=np.float64).reshape(-1, HISTORY_FIELDS)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        history = state.get(self.STATE_KEY)
        if set(state) != {self.STATE_KEY} or history.ndim != 2 or history.shape[1] != HISTORY_FIELDS:
            raise ValueError(f"privacy ledger state must be one (n, {HISTORY_FIELDS}) history array")
        self.history.clear()
        self._events = []
        self._epsilon = {}
        for server_round, partition, z, q, steps in history.tolist():
            self.history[int(partition)].append((float(z), float(q), int(steps)))
            self._events.append((int(server_round), int(partition), float(z), float(q), int(steps)))
        self._epsilon = {partition: self.client_epsilon(partition) for partition in self.history}


class PrivacyLedger(StrategyWrapper):
    """The book in the strategy chain: client spends from each accepted reply's privacy record,
    central DP's after each aggregation."""

    state_prefix = "privacy-ledger"

    def __init__(
        self, inner: Strategy, output_dir: Path, delta: float, central: CentralPrivacy | None = None
    ) -> None:
        super().__init__(inner)
        self.book = PrivacyBook(output_dir, delta)
        self.central = central

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rows = [
            row
            for reply in replies
            if not reply.has_error() and wire.PRIVACY in reply.content.config_records
            for row in self.book.client_rows(
                server_round, partition_of(reply), reply.content.config_records[wire.PRIVACY]
            )
        ]
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if self.central is not None and self.central.last_spend is not None and arrays is not None:
            rows.append(self._central_row(server_round))
        self.book.append(rows)
        return arrays, metrics

    def _central_row(self, server_round: int) -> dict[str, object]:
        spend = self.central.last_spend
        return {
            "round": server_round,
            "partition_id": None,
            "mechanism": f"central-dp({self.central.config.central_dp})",
            "epsilon": spend.epsilon,
            "delta": spend.delta,
            "noise_multiplier": spend.noise_multiplier,
            "clip_norm": spend.clipping_norm,
            "sample_rate": spend.sample_rate,
            "steps": spend.releases,
            "sampling": "adaptive" if spend.epsilon is None else "no-amplification",
        }

    def max_client_epsilon(self) -> float | None:
        return self.book.max_client_epsilon()

    def drop_rounds_after(self, last_round: int) -> None:
        self.book.drop_rounds_after(last_round)

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.book.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.book.load_state_dict(state)


def state_shapes() -> dict[str, tuple[int, ...] | None]:
    """The ledger's checkpoint keys; the history's length varies (None)."""
    return {f"{PrivacyLedger.state_prefix}/{PrivacyBook.STATE_KEY}": None}
