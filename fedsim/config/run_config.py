"""The run configuration: one flat record of every knob, validated before anything is written.

Keys are kebab-case, as in Flower's `[tool.flwr.app.config]`, so the same record drives
`fedsim run` (flags or a TOML file) and `flwr run .` (`context.run_config`). Missing keys take
defaults, because `run_simulation` hands the ServerApp an empty run config.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedsim.data.partition import PartitionSpec
from fedsim.errors import UserInputError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "krum", "fedmedian", "fedtrimmedavg")
# Names users reach for that the record spells differently (the CLI flag is --clients).
KEY_ALIASES = {"clients": "num_clients"}


def knob(default: Any, help: str, group: str) -> Any:
    """Declare one config knob: its default, its help text and its group. The CLI flags, the
    TOML/JSON keys and `--help` are all generated from these declarations."""
    return field(default=default, metadata={"help": help, "group": group})


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run; two runs with equal configs produce equal metrics."""

    # data
    name: str = knob("run", "Run name: the folder under --runs-dir.", "run")
    dataset: str = knob("digits", "Embedded dataset (see `fedsim datasets`).", "data")
    image_size: int = knob(0, "Resize images to N×N (e.g. 32 for CNN6); 0 keeps them.", "data")
    partitioner: str = knob("iid", "How to split: iid, dirichlet, pathological, longtail.", "data")
    alpha: float = knob(0.5, "Dirichlet concentration (smaller = more skewed).", "data")
    classes_per_client: int = knob(2, "Classes per client (pathological).", "data")
    imbalance_ratio: float = knob(10.0, "Head/tail class ratio (longtail).", "data")
    num_clients: int = knob(10, "Number of clients (virtual SuperNodes).", "data")
    # model and local training
    model: str = knob("mlp", "Model of the zoo (see `fedsim models`).", "training")
    rounds: int = knob(3, "Federated rounds.", "training")
    local_epochs: int = knob(2, "Local epochs per round.", "training")
    max_local_steps: int = knob(0, "Cap local SGD steps; 0 = no cap (1 + batch 1 = FedSGD).", "training")
    batch_size: int = knob(32, "Local batch size.", "training")
    learning_rate: float = knob(0.1, "Client SGD learning rate.", "training")
    momentum: float = knob(0.9, "Client SGD momentum (0 for plain SGD).", "training")
    seed: int = knob(0, "Seed for data split, init, sampling and training.", "training")
    # server strategy
    strategy: str = knob("fedavg", f"Aggregation: {', '.join(STRATEGIES)}.", "strategy")
    fraction_train: float = knob(1.0, "Share of clients trained per round.", "strategy")
    fraction_evaluate: float = knob(1.0, "Share of clients evaluating per round (0 = none).", "strategy")
    proximal_mu: float = knob(0.01, "FedProx proximal weight μ (fedprox only).", "strategy")
    server_learning_rate: float = knob(0.01, "FedAdam server learning rate η.", "strategy")
    num_malicious: int = knob(0, "Krum: tolerated malicious clients.", "strategy")
    trim_beta: float = knob(0.2, "FedTrimmedAvg: share trimmed at each end.", "strategy")
    reject_norm_ratio: float = knob(
        0.0, "Reject updates whose norm exceeds N × the round's median update norm; 0 = off.", "strategy"
    )
    # audit
    audit: bool = knob(False, "Attack client updates each round.", "audit")
    audit_attacks: str = knob("layerwise", "Comma-separated attacks (see `fedsim attacks`).", "audit")
    audit_clients: int = knob(2, "Clients audited per round (0 = every sampled client).", "audit")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from kebab- or snake-case keys; unknown keys and wrong types are user errors."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = field_name(raw_key)
            if key not in known:
                names = ", ".join(_flag(k) for k in known)
                raise UserInputError(f"unknown key {raw_key!r} in {source}; known keys: {names}")
            kwargs[key] = _coerce(raw_key, value, type(getattr(cls(), key)), source)
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: Path) -> RunConfig:
        """Read a TOML (or JSON) file of config keys, e.g. a saved `runs/<name>/config.json`."""
        try:
            text = path.read_text()
            values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UserInputError(
                f"cannot read config {path}: {str(err).splitlines()[0]}; pass a readable TOML or JSON file"
            ) from None
        if not isinstance(values, dict):
            raise UserInputError(f"config {path} is not a table of keys; write `key = value` lines")
        return cls.from_mapping(values, source=str(path))

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys, ready for JSON or a Flower ConfigRecord."""
        return {_flag(k): v for k, v in dataclasses.asdict(self).items()}

    def partition_spec(self) -> PartitionSpec:
        return PartitionSpec(
            kind=self.partitioner,
            num_partitions=self.num_clients,
            alpha=self.alpha,
            classes_per_client=self.classes_per_client,
            imbalance_ratio=self.imbalance_ratio,
            seed=self.seed,
        )

    def validate(self) -> None:
        """Checks that need no data; the partition spec is checked against the data in
        `fedsim.planning.validate_plan`."""
        if self.rounds < 1:
            raise UserInputError(f"rounds must be at least 1 (got {self.rounds}); pass --rounds 1 or more")
        if self.num_clients < 1:
            raise UserInputError(
                f"clients must be at least 1 (got {self.num_clients}); pass --clients 1 or more"
            )
        if self.strategy not in STRATEGIES:
            raise UserInputError(
                f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}"
            )
        for key in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, key)
            if not 0 <= value <= 1 or (key == "fraction_train" and value == 0):
                low = "(0" if key == "fraction_train" else "[0"
                raise UserInputError(
                    f"{_flag(key)} must be in {low}, 1] (got {value}); pass a share such as 0.5"
                )
        for key in ("max_local_steps", "audit_clients", "num_malicious", "momentum"):
            if getattr(self, key) < 0:
                raise UserInputError(f"{_flag(key)} must be >= 0 (got {getattr(self, key)}); pass 0 or more")
        for key in ("local_epochs", "batch_size", "learning_rate", "server_learning_rate"):
            if not getattr(self, key) > 0:
                raise UserInputError(
                    f"{_flag(key)} must be > 0 (got {getattr(self, key)}); pass a positive value"
                )
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise UserInputError(
                f"run name {self.name!r} is not a plain folder name; use letters, digits, '-'"
            )

    def attack_names(self) -> list[str]:
        return [name.strip() for name in self.audit_attacks.split(",") if name.strip()]

    def sampled_clients(self) -> int:
        """Clients trained per round, as Flower's strategies compute it (at least one)."""
        return max(int(self.num_clients * self.fraction_train), 1)


def _coerce(key: str, value: Any, wanted: type, source: str) -> Any:
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if wanted is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
        raise UserInputError(
            f"{key} in {source} must be {wanted.__name__}, got {value!r}; write it as a {wanted.__name__}"
        )
    return value


def field_name(key: str) -> str:
    """The RunConfig field a config key or CLI option names (kebab- or snake-case, or an alias)."""
    snake = key.replace("-", "_")
    return KEY_ALIASES.get(snake, snake)


def _flag(name: str) -> str:
    return name.replace("_", "-")
