"""Renderers of the reference pages, each from the declaration it documents.

Nothing here holds a copy of a list that lives in the code: the knobs come from
`RunConfig.knobs()`, the commands from the typer app, the CSV columns from their tuples, the zoo,
attacks, defences and datasets from their registries, the bad-input table from the corpus. The
only text written here is what a declaration does not say (what a CSV column means).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from docs.gen.markdown import cell, code, first_paragraph, table

CONFIG_PAGE = "config.md"  # where the knob table lives, for links from the command page


# ---- configuration keys and CLI flags --------------------------------------------------------


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return code(str(value).lower())
    if value == "":
        return 'none (`""`)'
    return code(repr(value) if isinstance(value, str) else value)


def _allowed(knob: Any) -> str:
    """The declared range or choices of a knob, as the validation checks them."""
    if knob.choices:
        return ", ".join(code(c) for c in knob.choices)
    low = f"≥ {knob.at_least:g}" if knob.at_least is not None else ""
    low = f"> {knob.above:g}" if knob.above is not None else low
    high = f"≤ {knob.at_most:g}" if knob.at_most is not None else ""
    high = f"< {knob.below:g}" if knob.below is not None else high
    return ", ".join(part for part in (low, high) if part) or "–"


def _flag(knob: Any) -> str:
    return f"`--{knob.key}` / `--no-{knob.key}`" if knob.type is bool else f"`--{knob.key}`"


def render_knobs(config_class: Any) -> str:
    """Every knob of `config_class` (a `RunConfig`), grouped as `fedsim run --help` groups them:
    its key (TOML, JSON and `flwr run -c`), flag, type, default, allowed values and help."""
    knobs = config_class.knobs()
    groups: dict[str, list[Any]] = {}
    for knob in knobs:
        groups.setdefault(knob.group, []).append(knob)
    parts = [
        "# Configuration keys\n",
        f"Every run setting is one knob declared on `{config_class.__module__}.{config_class.__qualname__}`. "
        "The same declaration gives the TOML/JSON key (`fedsim run --config`, `runs/<name>/config.json`), "
        "the `fedsim run` flag, the `flwr run . -c key=value` key and the validation. "
        f"{len(knobs)} knobs in {len(groups)} groups, in declaration order.\n",
    ]
    for group, members in groups.items():
        parts.append(f"## {group}\n")
        rows = []
        for knob in members:
            aliases = [k for k in knob.keys if k != knob.key]
            also = f" (also {', '.join(code(a) for a in aliases)})" if aliases else ""
            rows.append(
                [code(knob.key) + also, _flag(knob), code(knob.type.__name__), _default(knob.default),
                 _allowed(knob), cell(knob.help)]
            )  # fmt: skip
        parts.append(table(["key", "flag", "type", "default", "allowed", "what"], rows))
    return "\n".join(parts)


def _option_names(param: click.Parameter) -> str:
    names = [*param.opts, *getattr(param, "secondary_opts", [])]
    if isinstance(param, click.Argument):
        return code(param.name.upper() if param.name else "")
    return " / ".join(code(n) for n in names)


def _option_default(param: click.Parameter) -> str:
    if isinstance(param, click.Argument) or param.default is None:
        return "–"
    return _default(
        str(param.default) if not isinstance(param.default, bool | int | float) else param.default
    )


def render_commands(command_group: click.Group, config_class: Any) -> str:
    """Every `fedsim` subcommand with its options (typer's click group, as `--help` shows it); the
    config flags of `fedsim run` are listed once, on the configuration page."""
    knob_names = {knob.name for knob in config_class.knobs()}
    parts = [
        "# Command line\n",
        "`fedsim <command> --help` prints the same. Bad input to any command is one line, "
        "`error: <problem>; <fix>`, exit code 2, and nothing written.\n",
    ]
    for name, command in command_group.commands.items():
        if command.hidden:
            continue
        parts.append(f"## `fedsim {name}`\n")
        parts.append(f"{' '.join((command.help or '').split())}\n")
        params = [p for p in command.params if not getattr(p, "hidden", False)]
        # A command built with every knob as a flag (`fedsim run`) lists them on the config page;
        # another command's option that shares a knob's name (`audit --model`) is its own.
        with_knobs = knob_names <= {p.name for p in params}
        own = [p for p in params if not (with_knobs and p.name in knob_names)]
        knobbed = len(params) - len(own)
        if knobbed:
            parts.append(
                f"Besides the options below, every one of the {knobbed} [configuration keys]({CONFIG_PAGE}) "
                "is a flag `--<key>` (booleans: `--<key>` / `--no-<key>`).\n"
            )
        if own:
            rows = [[_option_names(p), _option_default(p), cell(getattr(p, "help", None) or "")] for p in own]
            parts.append(table(["option", "default", "what"], rows))
        else:
            parts.append("No options.\n")
    return "\n".join(parts)


# ---- CSV schemas -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CsvSchema:
    """One CSV file a run or a grid writes: its columns as the code declares them, and the words
    this page adds for each (keyed by column)."""

    file: str
    source: str  # where the column list is declared, e.g. `audits.scoring.engine.AUDIT_COLUMNS`
    summary: str
    columns: tuple[str, ...]
    descriptions: Mapping[str, str]


def undescribed(schema: CsvSchema) -> list[str]:
    """Columns the code declares that the page has no words for."""
    return [c for c in schema.columns if c not in schema.descriptions]


def stale(schema: CsvSchema) -> list[str]:
    """Descriptions of columns the code no longer declares."""
    return [c for c in schema.descriptions if c not in schema.columns]


def render_csv_schema(schema: CsvSchema) -> str:
    """One file's columns in their order, each with its description (or a mark that it has none)."""
    rows = [
        [str(i), code(column), cell(schema.descriptions.get(column, "*(not described yet)*"))]
        for i, column in enumerate(schema.columns, 1)
    ]
    return "\n".join(
        [
            f"## `{schema.file}`\n",
            f"{schema.summary} Columns from `{schema.source}`.\n",
            table(["#", "column", "what"], rows),
        ]
    )


def render_csv_schemas(schemas: Sequence[CsvSchema]) -> str:
    parts = [
        "# CSV files\n",
        "The files a run, an audit and a compare grid write, with their columns in file order. "
        "Empty cells mean *not applicable* or *not measured*; floats are written in full precision.\n",
    ]
    parts += [render_csv_schema(schema) for schema in schemas]
    return "\n".join(parts)


# ---- registries ----------------------------------------------------------------------------------


def render_models(models: Mapping[str, Any], options_of: Callable[[Any], Iterable[Any]]) -> str:
    """The zoo from its registry: each family's name, the inputs it takes, its natural dataset, its
    options with their defaults (`options_of(builder)`) and its builder's docstring."""
    rows = []
    for name, entry in models.items():
        options = ", ".join(code(f"{o.name}={o.default}") for o in options_of(entry.build)) or "–"
        rows.append([code(name), cell(", ".join(entry.takes)), code(entry.dataset), options,
                     cell(first_paragraph(entry.build))])  # fmt: skip
    return "\n".join(
        [
            "# Models\n",
            f"The {len(rows)} registered families of `models.MODELS`, in registry order. "
            '`--model NAME` picks one, `--model-options "key=value,..."` sets its options '
            "(typed from the builder's signature). `fedsim models` prints the same list. "
            "What each family is and what it leaks: [model families](../explanations/model-families.md).\n",
            table(["model", "takes", "natural dataset", "options (defaults)", "what"], rows),
        ]
    )


def render_attacks(attacks: Mapping[str, Any]) -> str:
    """The attacks from their registry: name, what it does, what it works on."""
    rows = [[code(name), cell(entry.description), cell(entry.works_on)] for name, entry in attacks.items()]
    return "\n".join(
        [
            "# Attacks\n",
            f"The {len(rows)} attacks of `attacks.registry.ATTACKS`, in registry order: "
            "`fedsim audit --attacks`, `fedsim run --audit-attacks` and `fedsim attacks` take these names. "
            "Each takes an `ObservedUpdate` (what the server saw) and returns a `Reconstruction` with "
            "its diagnostics (`attacks/base.py`).\n",
            table(["attack", "what", "works on"], rows),
        ]
    )


def render_defences(
    transformations: Mapping[str, Any],
    server_defences: Sequence[tuple[str, str, Sequence[str]]],
    config_class: Any,
) -> str:
    """The client-side defences of `--defence` from their registry, then the server-side modes
    (`fedsim defences` lists the same), each with the config keys it reads and their defaults."""

    def knobs(keys: Sequence[str]) -> str:
        return ", ".join(f"{code(key)} ({_default(config_class.knob(key).default)})" for key in keys) or "–"

    client = [
        [code(name), cell(entry.description), knobs(entry.knobs)] for name, entry in transformations.items()
    ]
    server = [[code(flag), cell(what), knobs(keys)] for flag, what, keys in server_defences]
    return "\n".join(
        [
            "# Defences\n",
            "Every defence comes from the library that implements it (Opacus, Flower); "
            "[the defences how-to](../how-to/defences.md) shows them in use.\n",
            "## Client side (`--defence`)\n",
            "Applied in the order listed, e.g. `--defence dp-sgd,topk`. "
            "Registry: `fedsim.training.transforms.TRANSFORMATIONS`.\n",
            table(["defence", "what", "config keys read (defaults)"], client),
            "## Server side and run modes\n",
            table(["flag", "what", "config keys read (defaults)"], server),
        ]
    )


def render_datasets(datasets: Mapping[str, Any], models: Mapping[str, Any]) -> str:
    """The datasets from their registry: modality, the registered models that take it, and the
    loader's docstring where it has one."""
    rows = []
    for name, entry in datasets.items():
        modality = getattr(entry, "modality", "")
        takers = [m for m, e in models.items() if modality in (getattr(e, "takes", ()) or ())]
        natural = [m for m, e in models.items() if getattr(e, "dataset", None) == name]
        loader = getattr(entry, "load", entry)
        rows.append([code(name), cell(modality), cell(", ".join(natural)), cell(", ".join(takers)),
                     cell(first_paragraph(loader))])  # fmt: skip
    return "\n".join(
        [
            "# Datasets\n",
            f"The {len(rows)} datasets of `fedsim.data.registry.DATASETS`. Every one ships inside a "
            "package, nothing is downloaded; an optional one that is missing stops a run with one "
            "line naming its install command.\n",
            table(
                ["dataset", "modality", "natural dataset of", "models that take its modality", "what"], rows
            ),
        ]
    )


# ---- the Python API (mkdocstrings) and the bad-input corpus ---------------------------------------


def render_api(objects: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A mkdocstrings page: one `::: dotted.name` block per object (its docstring, signature and
    members are read from the code at build time); `options` adds per-object handler options."""
    parts = [
        "# Python API\n",
        "`import fedsim` gives `fedsim.run`, `fedsim.audit` and `fedsim.compare`; the CLI is a thin "
        "layer over them. Generated from the docstrings.\n",
    ]
    for name in objects:
        parts.append(f"::: {name}")
        extra = (options or {}).get(name)
        if extra:
            parts.append("    options:")
            parts += [f"      {key}: {value}" for key, value in extra.items()]
        parts.append("")
    return "\n".join(parts)


def render_bad_input(rows: Sequence[tuple[str, str, str]]) -> str:
    """The corpus of bad input: each case's id, the input and the fragment its one error line holds."""

    def shown(text: str) -> str:
        escaped = text.encode("unicode_escape").decode() if any(ord(c) < 32 for c in text) else text
        return escaped if len(escaped) <= 70 else escaped[:67] + "..."

    body = [
        [str(i), code(cid), code(shown(what)), cell(shown(message))]
        for i, (cid, what, message) in enumerate(rows, 1)
    ]
    return "\n".join(
        [
            "# Bad input\n",
            "Every malformed input fedsim is known to meet gives **one line on stderr, "
            "`error: <problem>; <fix>`, exit code 2, and writes nothing**: no new run folder, a refused "
            "`--resume` leaves the run folder byte-identical, a refused audit leaves no output folder, "
            "and a checkpoint is never unpickled. How the corpus is checked: "
            "[reliability](../how-to/reliability.md#bad-input).\n",
            f"{len(rows)} cases, from `tests/fedsim/test_bad_input_corpus.py` (`CORPUS`) and the "
            "parametrized tables of `tests/fedsim/test_cli_errors.py`. Audit cases run "
            "`audit --model mlp --dataset digits --out {tmp}/audit` (shown as `audit [mlp, digits]`); "
            "`{tmp}` is the case's working folder; `runs/damaged` is a real run folder each resume "
            "case damages.\n",
            table(["#", "case", "input", "message contains"], body),
        ]
    )
