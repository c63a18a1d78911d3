"""A comparison grid: its spec (a TOML file and/or CLI lists) checked and expanded into cells.

A spec names models × defences × datasets × seeds and the run settings they share:

    name = "default"                 # the compare folder's default name: compare/<name>
    models = ["mlp", { name = "cnn6", image-size = 32 }]
    datasets = ["digits"]
    seeds = [0]
    defences = ["none", { name = "clip", clipping-norm = 1.0 }, { name = "dp-sgd", target-epsilon = 8 }]
    [run]                            # RunConfig keys every cell shares (rounds, clients, audit-...)
    rounds = 2

A model or dataset entry is a name or a table of `name` plus run-config keys that belong to it
(e.g. `image-size`, `model-options`, `learning-rate`) and an optional `label`; a model entry may
pin its own `dataset` (a name or a table), which replaces the datasets list for that model (a
text model and its corpus: `{ name = "cloze", dataset = "fortunes" }`); a defence entry is
a name or a table of `name` plus that defence's own parameters only (`fedsim defences` lists
them). Every cell's RunConfig is built and checked by the same `validate_plan` as `fedsim run`
before any cell runs, so a bad spec fails up front with one line (UserInputError).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.config.run_config import RunConfig
from fedsim.errors import UserInputError

# Top-level keys of a spec file.
SPEC_KEYS = ("name", "models", "datasets", "defences", "seeds", "run")
# Run settings every cell starts from (a short federation with the auditor on); `[run]` and the
# CLI override them. One audited client per round keeps the auditor's cost per round fixed;
# layer-wise inversion declines FedAvg's multi-step updates, iDLG attacks any update, so a
# default grid has a best attack either way.
COMPARE_DEFAULTS: dict[str, Any] = {
    "rounds": 2, "clients": 4, "audit": True, "audit-clients": 1, "audit-attacks": "layerwise,idlg",
}  # fmt: skip
# Keys that a cell sets itself (`name` is the cell id) or that only a defence entry may set.
CELL_KEYS = ("name",)
DEFENCE_KEYS = ("defence", "central-dp")
# The most cells one grid may have: each cell is a federation (a minute or more on 2 cores), so a
# grid beyond this is a typo (a seeds range, a product of long lists), refused before any check.
MAX_CELLS = 1000
# Characters kept in a cell id (it is a folder name).
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


@dataclass(frozen=True)
class DefenceKind:
    """One defence of the vocabulary: the run-config keys it always sets, the parameters a spec
    may give it, and how its short label reads."""

    sets: Mapping[str, Any]
    params: tuple[str, ...]
    label: str  # format string over the parameters' snake-case names and `target`


# `fedsim defences` names them `clip`, `topk`, `dp-sgd`, `gaussian` (client side, `--defence`) and
# `--central-dp server|client`; `top-k` is accepted for `topk`, `central-dp` means server side.
DEFENCES: dict[str, DefenceKind] = {
    "none": DefenceKind({}, (), "none"),
    "clip": DefenceKind({"defence": "clip"}, ("clipping-norm",), "clip(C={clipping_norm:g})"),
    "topk": DefenceKind({"defence": "topk"}, ("keep",), "top-k({keep:g})"),
    "dp-sgd": DefenceKind(
        {"defence": "dp-sgd"},
        ("noise-multiplier", "target-epsilon", "max-grad-norm", "target-delta", "poisson-sampling"),
        "dp-sgd({target})",
    ),
    "gaussian": DefenceKind({"defence": "gaussian"}, ("noise-std",), "gaussian(σ={noise_std:g})"),
    "central-dp": DefenceKind(
        {"central-dp": "server"},
        ("noise-multiplier", "clipping-norm", "target-delta"),
        "central-dp(z={noise_multiplier:g})",
    ),
    "central-dp-client": DefenceKind(
        {"central-dp": "client"},
        ("noise-multiplier", "clipping-norm", "target-delta"),
        "central-dp-client(z={noise_multiplier:g})",
    ),
}
ALIASES = {"top-k": "topk", "dpsgd": "dp-sgd", "dp_sgd": "dp-sgd"}


@dataclass(frozen=True)
class Axis:
    """One entry of the models or datasets list: its name, the run-config keys it sets, its label."""

    name: str
    settings: Mapping[str, Any]
    label: str
    dataset: Axis | None = None  # a model entry's own dataset: it runs on that one only


@dataclass(frozen=True)
class Defence:
    """One entry of the defences list: its label (`clip(C=1)`), the run-config keys it sets, and the
    folder-safe slug used in cell ids (`clip-C1`)."""

    name: str
    label: str
    settings: Mapping[str, Any]
    slug: str

    @property
    def params_json(self) -> str:
        return json.dumps(dict(self.settings), sort_keys=True)


@dataclass(frozen=True)
class Cell:
    """One federation of the grid."""

    id: str  # also its run directory's name under <compare dir>/runs/
    model: str
    dataset: str
    defence: Defence
    seed: int
    config: RunConfig


@dataclass(frozen=True)
class GridSpec:
    """A checked spec: its name and its cells in grid order (model, dataset, defence, seed)."""

    name: str
    cells: tuple[Cell, ...]


def read_spec_file(path: Path) -> dict[str, Any]:
    """The spec file's table; an unreadable file or bad TOML is bad input."""
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserInputError(
            f"cannot read compare spec {path}: {str(err).splitlines()[0]}; pass a readable TOML file"
        ) from None
    return values


def merge_overrides(spec: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """CLI values over a spec: a list (`models`, `defences`, `datasets`, `seeds`) replaces the
    spec's list; run keys (`rounds`, `clients`, ...) are set in its `[run]` table; None is unset."""
    merged = dict(spec)
    run = dict(merged.get("run") or {}) if isinstance(merged.get("run", {}), Mapping) else merged.get("run")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in SPEC_KEYS and key != "run":
            merged[key] = value
        elif isinstance(run, dict):  # over the spec's own spelling of the same knob, if any
            run = {k: v for k, v in run.items() if not _same_knob(k, key)}
            run[key] = value
    if run:
        merged["run"] = run
    return merged


def _same_knob(a: object, b: str) -> bool:
    try:
        return isinstance(a, str) and RunConfig.knob(a) is RunConfig.knob(b)
    except KeyError:
        return a == b


def build_grid(values: Mapping[str, Any], source: str = "compare spec") -> GridSpec:
    """Check a spec mapping and expand it into cells; any problem is one UserInputError line."""
    if not isinstance(values, Mapping):
        raise UserInputError(f"{source} must be a table of keys, got {type(values).__name__}")
    for key in values:
        if key not in SPEC_KEYS:
            raise UserInputError(f"unknown key {key!r} in {source}; use {', '.join(SPEC_KEYS)}")
    name = values.get("name", "grid")
    if not isinstance(name, str) or not name or _UNSAFE.search(name):
        raise UserInputError(f"name in {source} must be a folder-safe string such as 'default', got {name!r}")
    run = values.get("run", {})
    if not isinstance(run, Mapping):
        raise UserInputError(f"run in {source} must be a table of run-config keys, e.g. [run] rounds = 2")
    for key in run:
        if key in CELL_KEYS or key in DEFENCE_KEYS:
            what = "each cell's name is its id" if key in CELL_KEYS else "defences go in the defences list"
            raise UserInputError(f"key {key!r} is not allowed in [run] of {source}: {what}")
    base = {**COMPARE_DEFAULTS, **RunConfig.canonical(run, f"[run] of {source}", keep_unknown=True)}
    model_entries = _list(values, "models", ["mlp"], source)
    dataset_entries = _list(values, "datasets", ["digits"], source)
    defence_entries = _list(values, "defences", ["none"], source)
    seed_entries = _list(values, "seeds", [0], source)
    _check_cell_count(model_entries, dataset_entries, defence_entries, seed_entries, source)
    models = [_axis(entry, "models", source) for entry in model_entries]
    datasets = [_axis(entry, "datasets", source) for entry in dataset_entries]
    defences = [_defence(entry, source) for entry in defence_entries]
    seeds = [_seed(s, source) for s in seed_entries]
    cells = []
    for model in models:
        for dataset in [model.dataset] if model.dataset is not None else datasets:
            for defence in defences:
                for seed in seeds:
                    cell_id = f"{model.label}__{dataset.label}__{defence.slug}__s{seed}"
                    settings = {**base, **dataset.settings, **model.settings, **defence.settings}
                    settings.update(model=model.name, dataset=dataset.name, seed=seed, name=cell_id)
                    config = RunConfig.from_mapping(settings, source=f"{source} (cell {cell_id})")
                    cells.append(Cell(cell_id, model.name, dataset.name, defence, seed, config))
    seen: set[str] = set()
    for cell in cells:
        if cell.id in seen:
            raise UserInputError(
                f"two cells of {source} share the id {cell.id!r}; give one of the entries a distinct `label`"
            )
        seen.add(cell.id)
    return GridSpec(name, tuple(cells))


def check_cells(grid: GridSpec) -> dict[str, str]:
    """Check every cell before any runs. Names (model, dataset, attacks, defences) and every
    knob are spec errors: the first one raises, naming the cell. Then each cell's plan as
    `fedsim run` checks it (`validate_plan`: e.g. Opacus refusing a model's layer for dp-sgd):
    a combination that cannot run is returned as {cell id: one-line reason}, to be recorded as
    a failed row without running, unless no cell can run, which is a spec error too."""
    from fedsim.data import available_datasets  # torch and Flower: not at import
    from fedsim.plan.planning import check_attack_names, check_model_name, validate_plan
    from fedsim.training.transforms import check_transformation_names

    datasets = available_datasets()
    for cell in grid.cells:
        try:
            cell.config.validate()
            check_model_name(cell.config.model)
            if cell.config.dataset not in datasets:
                raise UserInputError(
                    f"unknown dataset {cell.config.dataset!r}; choose one of: {', '.join(datasets)}"
                )
            check_attack_names(cell.config.attack_names())
            check_transformation_names(cell.config.transformation_names())
        except UserInputError as err:
            raise UserInputError(f"cell {cell.id}: {err}") from None
    refused = {}
    for cell in grid.cells:
        try:
            validate_plan(cell.config)
        except UserInputError as err:
            refused[cell.id] = f"cannot run: {err}"
    if refused and len(refused) == len(grid.cells):
        first = grid.cells[0]
        raise UserInputError(
            f"no cell can run; cell {first.id}: {refused[first.id].removeprefix('cannot run: ')}"
        )
    return refused


def _check_cell_count(
    models: list[Any], datasets: list[Any], defences: list[Any], seeds: list[Any], source: str
) -> None:
    """Count the cells from the raw lists (a model that pins its dataset spans one) and refuse a
    grid over `MAX_CELLS` before building any of them."""
    per_model = [1 if isinstance(m, Mapping) and "dataset" in m else len(datasets) for m in models]
    count = sum(per_model) * len(defences) * len(seeds)
    if count > MAX_CELLS:
        raise UserInputError(
            f"{source} has {count:,} cells ({len(models)} models × {len(datasets)} datasets × "
            f"{len(defences)} defences × {len(seeds)} seeds), over the limit of {MAX_CELLS:,}; "
            "shorten a list or split the grid into several specs"
        )


def _list(values: Mapping[str, Any], key: str, default: list[Any], source: str) -> list[Any]:
    entries = values.get(key, default)
    if isinstance(entries, str):  # a CLI list arrives split already; a bare string is one entry
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise UserInputError(f"{key} in {source} must be a non-empty list, got {entries!r}")
    return entries


def _axis(entry: Any, key: str, source: str) -> Axis:
    """A models/datasets entry: a name, or a table of `name`, optional `label`, run-config keys."""
    what = key[:-1]
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise UserInputError(
            f"each entry of {key} in {source} must be a {what} name or a table with a name, got {entry!r}"
        )
    own = entry.get("dataset") if key == "models" else None
    settings = {k: v for k, v in entry.items() if k not in ("name", "label", "dataset")}
    settings = RunConfig.canonical(settings, f"{what} {entry['name']!r} of {source}", keep_unknown=True)
    for k in [*settings, *(["dataset"] if key == "datasets" and "dataset" in entry else [])]:
        if k in CELL_KEYS or k in DEFENCE_KEYS or k in ("model", "dataset", "seed"):
            raise UserInputError(f"key {k!r} is not allowed in a {what} entry of {source}")
    RunConfig.from_mapping(settings, source=f"{what} {entry['name']!r} of {source}")  # unknown keys, types
    label = entry.get("label", entry["name"])
    dataset = None if own is None else _axis(own, "datasets", f"model {entry['name']!r} of {source}")
    return Axis(entry["name"], settings, _slug(label, f"label of {what} {entry['name']!r}"), dataset)


def _defence(entry: Any, source: str) -> Defence:
    """A defences entry: a name of the vocabulary, or a table of `name` and its parameters."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise UserInputError(
            f"each entry of defences in {source} must be a defence name or a table with a name, got {entry!r}"
        )
    raw = entry["name"]
    name = ALIASES.get(raw, raw)
    kind = DEFENCES.get(name)
    if kind is None:
        raise UserInputError(f"unknown defence {raw!r} in {source}; choose from: {', '.join(DEFENCES)}")
    given = {k: v for k, v in entry.items() if k not in ("name", "label")}
    for key in given:
        if key not in kind.params:
            allowed = ", ".join(kind.params) or "none"
            raise UserInputError(
                f"defence {name!r} in {source} takes no key {key!r}; its parameters: {allowed}"
            )
    settings = {**kind.sets, **given}
    config = RunConfig.from_mapping(settings, source=f"defence {name!r} of {source}")  # types, ranges
    config.validate()
    values = {k.replace("-", "_"): getattr(config, RunConfig.knob(k).name) for k in kind.params}
    values["target"] = (
        f"ε={config.target_epsilon:g}" if config.target_epsilon > 0 else f"z={config.noise_multiplier:g}"
    )
    label = kind.label.format(**values)
    # Record the parameters the label reads too (their defaults), so the row says what ran.
    keys = [*settings, *(k for k in _label_keys(name, config) if k not in settings)]
    settings = {k: getattr(config, RunConfig.knob(k).name) for k in keys}
    slug = _slug(entry.get("label", label), f"label of defence {name!r}")
    return Defence(name, entry.get("label", label), settings, slug)


def _label_keys(name: str, config: RunConfig) -> tuple[str, ...]:
    if name == "dp-sgd":
        return ("target-epsilon",) if config.target_epsilon > 0 else ("noise-multiplier", "max-grad-norm")
    return {
        "clip": ("clipping-norm",),
        "topk": ("keep",),
        "gaussian": ("noise-std",),
        "central-dp": ("noise-multiplier", "clipping-norm"),
        "central-dp-client": ("noise-multiplier", "clipping-norm"),
    }.get(name, ())


def _slug(label: Any, what: str) -> str:
    """A folder-safe form of a label: `clip(C=1)` -> `clip-C1`, `dp-sgd(ε=8)` -> `dp-sgd-eps8`."""
    if not isinstance(label, str) or not label:
        raise UserInputError(f"{what} must be a non-empty string, got {label!r}")
    text = label.replace("ε", "eps").replace("σ", "sigma").replace("=", "")
    slug = _UNSAFE.sub("-", text).strip("-")
    if not slug or slug in (".", ".."):
        raise UserInputError(f"{what} {label!r} has no letters or digits to name a folder with")
    return slug


def _seed(value: Any, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserInputError(f"seeds in {source} must be integers, got {value!r}")
    RunConfig.knob("seed").check(value, flag="--seeds")
    return value


def parse_list(text: str | None) -> list[str] | None:
    """A CLI list `a,b,c` (None when not given); an empty list is bad input."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UserInputError(f"empty entry in the list {text!r}; pass comma-separated names such as mlp,cnn6")
    return items


def parse_seeds(text: str | None) -> list[int] | None:
    items = parse_list(text)
    if items is None:
        return None
    try:
        return [int(item) for item in items]
    except ValueError:
        raise UserInputError(f"--seeds takes comma-separated integers, got {text!r}") from None


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def describe(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """The cells as JSON-able records (written beside compare.csv so a reader sees the plan)."""
    return [
        {"cell": c.id, "model": c.model, "dataset": c.dataset, "defence": c.defence.label,
         "defence_params": dict(c.defence.settings), "seed": c.seed, "config": c.config.to_dict()}
        for c in cells
    ]  # fmt: skip
