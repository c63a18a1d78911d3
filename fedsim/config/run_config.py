"""The run configuration: one flat record of every knob, validated before anything is written.

Each knob is declared once, as a field with `knob(default, help, group, ...)`: its type, default,
help text, group, public key and allowed range. The TOML/JSON keys, the Flower run-config keys,
`fedsim run`'s flags (with `--help` grouped and showing defaults) and the validation are all
generated from those declarations, so adding a field adds its flag, its key and its checks.

Keys are kebab-case, as in Flower's `[tool.flwr.app.config]`, so the same record drives
`fedsim run` (flags or a TOML file) and `flwr run .` (`context.run_config`). Missing keys take
defaults, because `run_simulation` hands the ServerApp an empty run config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import tomllib
import typing
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config.partition_spec import PartitionSpec
from fedsim.errors import UserInputError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "krum", "fedmedian", "fedtrimmedavg")
# numpy's SeedSequence and torch.manual_seed both take any 32-bit unsigned seed.
MAX_SEED = 2**32 - 1
# Flower's ConfigRecord (and config.json readers in other languages) hold signed 64-bit ints.
INT_LIMIT = 2**63
# Caps that only a typo reaches: a run past them would not finish in days (a round takes at
# least a fraction of a second), and a run that cannot finish is bad input, not a long run.
MAX_ROUNDS = 100_000
MAX_LOCAL_EPOCHS = 10_000
NAME_MAX = 255  # bytes in one folder name on Linux, macOS and Windows file systems
FLOAT32_MAX = float(np.finfo(np.float32).max)
DEFAULT_REJECT_NORM_RATIO = 1000.0
_KIND_NAMES = {
    "int": "a whole number",
    "float": "a number",
    "str": "a quoted string",
    "bool": "true or false",
}


def knob(
    default: Any,
    help: str,
    group: str,
    *,
    key: str | None = None,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """Declare one config knob. `key` is its public name when it differs from the field's
    (the field's own kebab-case name stays accepted); `at_least`/`above`/`at_most` bound a
    number (`below`: strictly); `choices` lists the allowed strings."""
    bounds = {"at_least": at_least, "above": above, "at_most": at_most, "below": below, "choices": choices}
    return field(default=default, metadata={"help": help, "group": group, "key": key, **bounds})


@dataclass(frozen=True)
class Knob:
    """One knob as the CLI, the config files and the validation see it."""

    name: str  # the RunConfig field
    key: str  # the public kebab-case key and flag (`--<key>`)
    type: type
    default: Any
    help: str
    group: str
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    choices: Sequence[str] | None = None

    @property
    def description(self) -> str:
        """The help text, with the allowed values where the knob declares them."""
        return f"{self.help} One of: {', '.join(self.choices)}." if self.choices else self.help

    @property
    def keys(self) -> tuple[str, ...]:
        """Every spelling a config file may use: the public key and the field's own name."""
        return tuple(dict.fromkeys((self.key, self.name.replace("_", "-"), self.name)))

    def coerce(self, value: Any, source: str) -> Any:
        """A value read from a file, as the declared type: ints widen to floats, integral floats
        narrow to ints; anything else of the wrong type is a user error."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if self.type is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            name = self.type.__name__
            raise UserInputError(
                f"{self.key} in {source} must be {name}, got {value!r}; write it as {_KIND_NAMES[name]}"
            )
        return value

    def check(self, value: Any, flag: str | None = None) -> None:
        """Raise UserInputError unless `value` is a valid setting: the declared type, finite,
        within the declared range and choices, and free of control characters. `flag` is the
        option the hint names (default `--<key>`; `fedsim compare` passes `--seeds`)."""
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise UserInputError(
                f"{self.key} must be {self.type.__name__}, got {value!r}; pass a {self.type.__name__}"
            )
        if isinstance(value, str):
            check_text(self.key, value, allow_empty=self.default == "")  # "" = none, e.g. no transforms
            if self.choices is not None and value not in self.choices:
                raise UserInputError(
                    f"unknown {self.key} {value!r}; choose one of: {', '.join(self.choices)}"
                )
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(
                f"{self.key} must be a finite number (got {value}); pass e.g. {self.default}"
            )
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # models train in float32
            raise UserInputError(
                f"{self.key} {value:g} overflows float32, in which models train; pass e.g. {self.default}"
            )
        self._check_range(value, flag or f"--{self.key}")  # first: a seed of 2**64 is out of range
        if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
            raise UserInputError(
                f"{self.key} {value} does not fit a 64-bit integer; pass e.g. {self.default}"
            )

    def _check_range(self, value: float, flag: str) -> None:
        low_ok = (self.at_least is None or value >= self.at_least) and (
            self.above is None or value > self.above
        )
        high_ok = (self.at_most is None or value <= self.at_most) and (
            self.below is None or value < self.below
        )
        if low_ok and high_ok:
            return
        has_low = self.at_least is not None or self.above is not None
        has_high = self.at_most is not None or self.below is not None
        if has_low and has_high:
            low = f"[{_num(self.at_least)}" if self.at_least is not None else f"({_num(self.above)}"
            high = f"{_num(self.at_most)}]" if self.at_most is not None else f"{_num(self.below)})"
            raise UserInputError(
                f"{self.key} must be in {low}, {high} (got {value}); pass {flag} in that range"
            )
        if self.at_least is not None:
            raise UserInputError(
                f"{self.key} must be at least {_num(self.at_least)} (got {value}); "
                f"pass {flag} {_num(self.at_least)} or more"
            )
        if self.above is not None:
            raise UserInputError(
                f"{self.key} must be > {_num(self.above)} (got {value}); pass {flag} above {_num(self.above)}"
            )
        bound, word = (self.at_most, "at most") if self.at_most is not None else (self.below, "below")
        raise UserInputError(
            f"{self.key} must be {word} {_num(bound)} (got {value}); pass {flag} {word} {_num(bound)}"
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run; two runs with equal configs produce equal metrics."""

    # run
    name: str = knob("run", "Run name: the folder under --runs-dir.", "run")
    # data
    dataset: str = knob("digits", "Embedded dataset (see `fedsim datasets`).", "data")
    image_size: int = knob(0, "Resize images to N×N (e.g. 32 for CNN6); 0 keeps them.", "data", at_least=0)
    partitioner: str = knob(
        "iid",
        "How to split: iid, dirichlet, pathological, longtail, covariate (ranges of the dataset's "
        "covariate, e.g. splash impact height).",
        "data",
    )
    alpha: float = knob(0.5, "Dirichlet concentration (smaller = more skewed).", "data")
    classes_per_client: int = knob(2, "Classes per client (pathological).", "data")
    imbalance_ratio: float = knob(10.0, "Head/tail class ratio (longtail).", "data")
    num_clients: int = knob(10, "Number of clients (virtual SuperNodes).", "data", key="clients", at_least=1)
    # model and local training
    model: str = knob("mlp", "Model of the zoo (see `fedsim models`).", "training")
    model_options: str = knob(
        "", "Model options as key=value pairs, comma-separated, e.g. hidden=64,depth=3.", "training"
    )
    rounds: int = knob(3, "Federated rounds.", "training", at_least=1, at_most=MAX_ROUNDS)
    local_epochs: int = knob(2, "Local epochs per round.", "training", at_least=1, at_most=MAX_LOCAL_EPOCHS)
    max_local_steps: int = knob(
        0, "Cap local SGD steps; 0 = no cap (1 + batch 1 = FedSGD).", "training", at_least=0
    )
    batch_size: int = knob(32, "Local batch size.", "training", at_least=1)
    learning_rate: float = knob(0.1, "Client SGD learning rate.", "training", above=0)
    momentum: float = knob(0.9, "Client SGD momentum (0 for plain SGD).", "training", at_least=0)
    seed: int = knob(
        0, "Seed for data split, init, sampling and training.", "training", at_least=0, at_most=MAX_SEED
    )
    # server strategy
    strategy: str = knob("fedavg", "Server aggregation strategy.", "strategy", choices=STRATEGIES)
    fraction_train: float = knob(1.0, "Share of clients trained per round.", "strategy", above=0, at_most=1)
    fraction_evaluate: float = knob(
        1.0, "Share of clients evaluating per round (0 = none).", "strategy", at_least=0, at_most=1
    )
    # A large model's evaluation of the whole test split can outlast its round's training.
    server_eval_samples: int = knob(
        0,
        "Test samples the server scores each round (0 = all; a fixed seeded subset).",
        "strategy",
        at_least=0,
    )
    proximal_mu: float = knob(0.01, "FedProx proximal weight μ (fedprox only).", "strategy")
    server_learning_rate: float = knob(0.01, "FedAdam server learning rate η.", "strategy", above=0)
    num_malicious: int = knob(0, "Krum: tolerated malicious clients.", "strategy", at_least=0)
    trim_beta: float = knob(0.2, "FedTrimmedAvg: share trimmed at each end.", "strategy")
    # On by default: one client's update 10⁶× too large (a unit bug, an overflowed sum) would
    # otherwise dominate the average and wreck the model. 1000× is far beyond honest spread, so the
    # default is a safety net for garbage, not a Byzantine defence (lower it, e.g. 10, for that).
    # A median needs 3+ valid replies to be an honest one: with 2 clients it cannot catch anything.
    reject_norm_ratio: float = knob(
        DEFAULT_REJECT_NORM_RATIO,
        "Reject updates whose norm exceeds N × the round's median update norm; 0 = off.",
        "strategy",
    )
    round_timeout: float = knob(
        3600.0,
        "Seconds to wait for a round's late replies once its first is in; later = no reply.",
        "strategy",
        above=0,
    )
    # defences: client-side (the client-transformation registry), central DP, secure aggregation
    defence: str = knob(
        "", "Client-side defences, comma-separated, applied in order (see `fedsim defences`).", "defence"
    )
    noise_multiplier: float = knob(
        1.0, "Gaussian noise multiplier z of DP-SGD and of central DP.", "defence", at_least=0
    )
    max_grad_norm: float = knob(1.0, "DP-SGD: per-sample gradient clipping norm C.", "defence", above=0)
    target_epsilon: float = knob(
        0.0,
        "DP-SGD: calibrate z so each client spends this ε over the run; 0 = use z.",
        "defence",
        at_least=0,
    )
    target_delta: float = knob(
        1e-5, "δ at which ε is reported (DP-SGD and central DP).", "defence", above=0, below=1
    )
    poisson_sampling: bool = knob(
        True, "DP-SGD: Poisson-sample batches (what its ε assumes); false = shuffled batches.", "defence"
    )
    clipping_norm: float = knob(
        1.0,
        "L2 norm the whole update is clipped to (clip, central DP; adaptive: the initial one).",
        "defence",
        above=0,
    )
    keep: float = knob(0.1, "topk: share of each tensor's update kept.", "defence", above=0, at_most=1)
    noise_std: float = knob(0.01, "gaussian: noise std per update entry.", "defence", above=0)
    central_dp: str = knob(
        "off",
        "Central DP: clip on the server or on the clients, noise at the server.",
        "defence",
        choices=("off", "server", "client"),
    )
    adaptive_clipping: bool = knob(
        False, "Central DP: adapt the clipping norm each round (Andrew et al.); no ε accounting.", "defence"
    )
    target_quantile: float = knob(
        0.5, "Adaptive clipping: share of updates left unclipped.", "defence", above=0, below=1
    )
    clip_norm_lr: float = knob(0.2, "Adaptive clipping: its learning rate.", "defence", above=0)
    secagg: bool = knob(False, "Secure aggregation (SecAgg+): the server sees only the sum.", "defence")
    secagg_shares: int = knob(3, "SecAgg+: secret shares per client.", "defence", at_least=3)
    secagg_threshold: int = knob(2, "SecAgg+: shares needed to reconstruct a secret.", "defence", at_least=2)
    # audit
    audit: bool = knob(False, "Attack client updates each round.", "audit")
    audit_attacks: str = knob("layerwise", "Comma-separated attacks (see `fedsim attacks`).", "audit")
    audit_clients: int = knob(2, "Clients audited per round (0 = every sampled client).", "audit", at_least=0)
    audit_workers: int = knob(
        1,
        "Worker processes attacking updates while later rounds train (0 = inside the round, serially).",
        "audit",
        at_least=0,
    )

    def __post_init__(self) -> None:
        # RunConfig(learning_rate=1) means 1.0: keep float knobs floats so equal configs
        # serialise (config.json, Flower records) identically.
        for spec in self.knobs():
            value = getattr(self, spec.name)
            if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, spec.name, float(value))

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        """Every knob in declaration order (the order of `--help` and of config.json)."""
        return _knobs(cls)

    @classmethod
    def knob(cls, key: str) -> Knob:
        """The knob a config key, flag name or field name names (KeyError if none)."""
        return _knob_by_key(cls)[key]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> RunConfig:
        """Build from kebab- or snake-case keys; unknown keys and wrong types are user errors."""
        by_key = _knob_by_key(cls)
        return cls(
            **{by_key[k].name: by_key[k].coerce(v, source) for k, v in cls.canonical(values, source).items()}
        )

    @classmethod
    def canonical(
        cls, values: Mapping[str, Any], source: str = "config", keep_unknown: bool = False
    ) -> dict[str, Any]:
        """The same settings under each knob's public key (`num_clients` -> `clients`), so that
        mappings can be merged; one knob given under several spellings (`clients`, `num-clients`,
        `num_clients`: the last would silently win) is a user error, and so is an unknown key
        unless `keep_unknown` passes it through for a later check to name in its own context."""
        by_key = _knob_by_key(cls)
        found: dict[str, Any] = {}
        for raw_key, value in values.items():
            spec = by_key.get(raw_key) if isinstance(raw_key, str) else None
            if spec is None and keep_unknown:
                found[raw_key] = value
                continue
            if spec is None:
                close = difflib.get_close_matches(str(raw_key), list(by_key), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "see `fedsim run --help` for the keys"
                raise UserInputError(f"unknown key {raw_key!r} in {source}; {hint}")
            if spec.key in found:
                spellings = [k for k in values if isinstance(k, str) and by_key.get(k) is spec]
                raise UserInputError(
                    f"{source} sets {spec.key} {len(spellings)} times, as {', '.join(map(repr, spellings))}; "
                    f"keep one (`{spec.key} = ...`)"
                )
            found[spec.key] = value
        return found

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
        if not text.strip():  # a truncated or never-written file, not a request for the defaults
            raise UserInputError(f"config {path} is empty; write `key = value` lines or drop --config")
        if not isinstance(values, dict):
            raise UserInputError(f"config {path} is not a table of keys; write `key = value` lines")
        return cls.from_mapping(values, source=str(path))

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case field names (config.json and the Flower ConfigRecord keep `num-clients`,
        which every reader accepts next to the public `clients`)."""
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
        """Checks that need no data (each knob against its declaration, then the run name); the
        partition spec is checked against the data in `fedsim.plan.planning.validate_plan`."""
        for spec in self.knobs():
            spec.check(getattr(self, spec.name))
        if self.name.startswith(".") or "/" in self.name or "\\" in self.name:
            raise UserInputError(
                f"run name {self.name!r} is not a plain folder name; use letters, digits, '-'"
            )
        if len(self.name.encode()) > NAME_MAX:  # the OS refuses it only once the folder is made
            raise UserInputError(
                f"run name {self.name[:20]!r}... is {len(self.name.encode())} bytes long, more than a "
                f"folder name may be ({NAME_MAX}); pass a shorter --name"
            )

    def transformation_names(self) -> list[str]:
        """The client-side defences, in the order they wrap the training triple."""
        return [name.strip() for name in self.defence.split(",") if name.strip()]

    def attack_names(self) -> list[str]:
        return [name.strip() for name in self.audit_attacks.split(",") if name.strip()]

    def sampled_clients(self) -> int:
        """Clients trained per round, as Flower's strategies compute it (at least one)."""
        return max(int(self.num_clients * self.fraction_train), 1)


def check_text(what: str, value: str, allow_empty: bool = False) -> None:
    """Names and strings become folder names, CSV cells and Flower records: refuse empty ones
    and control characters (NUL truncates paths in C code, newlines split CSV rows)."""
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise UserInputError(
            f"{what} {value!r} contains the control character {bad!r}; use printable characters only"
        )
    if not value.strip() and not allow_empty:
        raise UserInputError(f"{what} is empty; pass a non-empty value")


@functools.cache
def _knobs(cls: type[RunConfig]) -> tuple[Knob, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        Knob(
            name=f.name,
            key=f.metadata["key"] or _flag(f.name),
            type=hints[f.name],
            default=f.default,
            help=f.metadata["help"],
            group=f.metadata["group"],
            at_least=f.metadata["at_least"],
            above=f.metadata["above"],
            at_most=f.metadata["at_most"],
            below=f.metadata["below"],
            choices=f.metadata["choices"],
        )
        for f in fields(cls)
    )


@functools.cache
def _knob_by_key(cls: type[RunConfig]) -> dict[str, Knob]:
    return {key: spec for spec in _knobs(cls) for key in spec.keys}


def _num(value: float | None) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _flag(name: str) -> str:
    return name.replace("_", "-")
