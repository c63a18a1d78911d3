"""`fedsim`: run federations and audit models from the shell, a thin layer over `fedsim.api`.

User mistakes print one line, `error: <problem>; <fix>`, and exit with code 2 before anything is
written; a run that stops early prints one line and exits 1; tracebacks are kept for bugs.
`fedsim run`'s config flags are generated from the knobs declared on `RunConfig`.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.table import Table

from attacks.registry import ATTACKS, available_attacks
from audits.architecture.report import ROUNDING_LEARNING_RATE
from audits.scoring.engine import AuditRow
from audits.scoring.summary import summarise_audit
from fedsim import api
from fedsim.config.run_config import Knob, RunConfig
from fedsim.data import available_datasets
from fedsim.errors import RunFailedError, UserInputError
from fedsim.grid.report import write_report
from fedsim.plan.resume import open_for_resume
from fedsim.progress import status_progress
from fedsim.training.transforms import TRANSFORMATIONS, available_transformations
from models import available_models, modalities_taken, model_options, natural_dataset

cli = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated-learning simulator with privacy auditing."
)
console = Console(stderr=True)

Opt = typer.Option
LAUNCH = "Launch"  # the --help panel of `fedsim run`'s options that are not config knobs
RUNS = Path("runs")
Command = TypeVar("Command", bound=Callable[..., Any])


def with_config_flags(command: Command) -> Command:
    """Give `command` (which takes the knobs as `**knobs`) one option per RunConfig knob, with
    the declared default, help and group (`--help` shows one panel per group)."""
    own = inspect.signature(command, eval_str=True)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [_knob_parameter(spec) for spec in RunConfig.knobs()]
    command.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    return command


def _knob_parameter(spec: Knob) -> inspect.Parameter:
    names = [f"--{spec.key}/--no-{spec.key}"] if spec.type is bool else [f"--{spec.key}"]
    shown: bool | str = "none" if spec.default == "" else True  # typer prints nothing for ""
    option = Opt(*names, help=spec.description, show_default=shown, rich_help_panel=f"Config: {spec.group}")
    annotation = Annotated[spec.type, option]  # type: ignore[name-defined]
    return inspect.Parameter(
        spec.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default, annotation=annotation
    )


def given_flags(ctx: typer.Context, knobs: dict[str, Any]) -> dict[str, Any]:
    """The knobs typed on the command line: they override a --config file, defaults do not."""
    return {
        name: value
        for name, value in knobs.items()
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }


@cli.command()
@with_config_flags
def run(
    ctx: typer.Context,
    config: Annotated[
        Path | None, Opt(help="TOML file of config keys (flags override it).", rich_help_panel=LAUNCH)
    ] = None,
    runs_dir: Annotated[Path, Opt(help="Folder that holds run directories.", rich_help_panel=LAUNCH)] = RUNS,
    resume: Annotated[
        Path | None, Opt(help="Continue runs/<name> from its last complete round.", rich_help_panel=LAUNCH)
    ] = None,
    stop_after: Annotated[
        int | None, Opt(help="Stop after this round (resume later).", rich_help_panel=LAUNCH)
    ] = None,
    cpus: Annotated[
        int | None, Opt(help="CPU cores for the simulation (default: all).", rich_help_panel=LAUNCH)
    ] = None,
    ray_address: Annotated[
        str | None, Opt(help="Join a running Ray cluster, e.g. 'auto'.", rich_help_panel=LAUNCH)
    ] = None,
    verbose: Annotated[bool, Opt(help="Show Flower's and Ray's logs.", rich_help_panel=LAUNCH)] = False,
    **knobs: Any,
) -> None:
    """Run a federated simulation and write runs/<name>/ (metrics, checkpoints, plot)."""
    overrides = given_flags(ctx, knobs)
    try:
        if resume is not None:
            if overrides or config is not None:
                raise UserInputError(
                    "--resume continues a run with its saved config; drop the other run flags"
                )
            store = open_for_resume(resume)  # damaged folders refused before the progress bar shows
            run_config, done = None, store.last_complete_round() or 0
            shown = store.config
        else:
            base = RunConfig.from_file(config) if config is not None else RunConfig()
            run_config, done = base.replace(**overrides), 0
            shown = run_config
        total = min(shown.rounds, stop_after or shown.rounds)
        with _RoundProgress(shown.name, total, done) as progress:
            result = api.run(
                run_config, runs_dir=runs_dir, resume=resume, stop_after=stop_after, cpus=cpus,
                ray_address=ray_address, on_round=progress, verbose=verbose,
            )  # fmt: skip
    except UserInputError as err:
        _fail(err)
    except RunFailedError as err:
        if err.details:
            console.print(err.details, markup=False, highlight=False)
        console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(RunFailedError.exit_code) from None
    if resume is not None and result.rounds_run == 0:
        console.print(
            f"{result.path}: already at round {result.last_round} of {result.config.rounds}; nothing to do"
        )
        return
    console.print(f"round {result.last_round}: server test {_scores(result.final)} -> {result.path}")
    if result.audit_path is not None:
        _print_audit_summary(result.audit_path, f"audit: {result.audit_path}")


def _scores(metrics: dict[str, float]) -> str:
    """The model's evaluation metrics (`eval_*` columns), accuracy first: "accuracy 0.93, loss 0.21"."""
    named = {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_")}
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(named.items(), key=lambda kv: kv[0] == "loss"))


def _print_audit_summary(source: Path | list[AuditRow], title: str) -> None:
    """One table for `fedsim run --audit` and `fedsim audit`: both summarise the same rows."""
    table = Table(title=title)
    table.add_column("attack", no_wrap=True)
    for column in ("updates", "images", "PSNR", "max PSNR", "SSIM", "labels", "s/image"):
        table.add_column(column)
    summary = summarise_audit(source)
    for s in summary:
        cells = [_fmt(s[k], f) for k, f in (("mean_psnr", ".1f"), ("max_psnr", ".1f"), ("mean_ssim", ".3f"),
                                            ("label_score", ".2f"), ("mean_seconds", ".2f"))]  # fmt: skip
        table.add_row(s["attack"], str(s["updates"]), str(s["reconstructed"]), *cells)
    out = Console()
    out.print(table)
    for s in summary:
        if s["note"]:
            out.print(f"{s['attack']}: {s['note']}", markup=False, highlight=False)


class _RoundProgress:
    """A rich progress bar over rounds, advanced by `fedsim.run`'s per-round callback and shown
    from the first round on (an error before it prints only its line); plain lines when stderr
    is not a terminal."""

    def __init__(self, name: str, total: int, done: int) -> None:
        self.plain = not sys.stderr.isatty()
        self.progress = status_progress(console, disable=self.plain)
        self.task = self.progress.add_task(name, total=total, completed=done, status="")
        self.started = False

    def __enter__(self) -> _RoundProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()

    def __call__(self, server_round: int, metrics: dict[str, float]) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        status = _scores(metrics)
        self.progress.update(self.task, completed=server_round, status=status)
        if self.plain:
            console.print(f"round {server_round}: {status}", markup=False, highlight=False)


@cli.command()
def audit(
    model: Annotated[str, Opt(help=f"One of: {', '.join(available_models())}.")] = "cnn6",
    dataset: Annotated[
        str | None,
        Opt(
            help=f"Samples to attack, from: {', '.join(available_datasets())}; default: the model's "
            "natural dataset (`fedsim models`)."
        ),
    ] = None,
    data: Annotated[str | None, Opt("--data", hidden=True, help="Old name of --dataset.")] = None,
    image_size: Annotated[int, Opt(help="Resize images to N×N; 0 keeps them.")] = 0,
    head: Annotated[str, Opt(help="'ce' (softmax with bias) or 'logistic' (R-GAP's one logit).")] = "ce",
    model_options: Annotated[str, Opt(help=RunConfig.knob("model-options").help)] = "",
    weights: Annotated[Path | None, Opt(help="Model weights (.safetensors, e.g. a run checkpoint).")] = None,
    samples: Annotated[int, Opt(help="Samples to attack (one batch-1 gradient each).")] = 4,
    attacks: Annotated[str, Opt(help="Comma-separated (see `fedsim attacks`).")] = "layerwise",
    seed: Annotated[int, Opt(help="Seed for the initial weights and the sample choice.")] = 0,
    gradient_noise: Annotated[
        float,
        Opt(
            help="Std of Gaussian noise added to each gradient entry the attacks see; 0 = exact "
            "(the PSNR ceiling is then at float32 rounding of a one-step weight delta at "
            f"lr {ROUNDING_LEARNING_RATE:g})."
        ),
    ] = 0.0,
    out: Annotated[
        Path | None, Opt(help="Output folder (default runs/audit-<model>-<dataset>-<time>).")
    ] = None,
) -> None:
    """Audit one model's leakage: per-layer rank table and score, end-to-end rank, PSNR ceiling,
    attacks on N samples."""
    dataset = data or dataset
    if dataset is None and model in available_models():
        dataset = natural_dataset(model)
    folder = out or RUNS / f"audit-{model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        result = api.audit(
            model=model, dataset=dataset, samples=samples, attacks=attacks, weights=weights, seed=seed,
            out=folder, image_size=image_size, head=head, gradient_noise=gradient_noise,
            model_options=model_options,
        )  # fmt: skip
    except UserInputError as err:
        _fail(err)
    out_console = Console()
    out_console.print(result.architecture.to_table(), markup=False, highlight=False, soft_wrap=True)
    _print_audit_summary(result.audit_rows, f"audit of {model} on {dataset}")
    out_console.print(f"wrote {folder}/: {', '.join(p.name for p in result.files)}")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


@cli.command("compare")
def compare(
    spec: Annotated[
        Path | None,
        typer.Argument(help="TOML grid spec (docs/how-to/compare.md); the CLI lists replace its lists."),
    ] = None,
    models: Annotated[str | None, Opt(help="Comma-separated models, e.g. mlp,cnn6.")] = None,
    defences: Annotated[
        str | None, Opt(help="Comma-separated defences: none, clip, topk, dp-sgd, gaussian, central-dp.")
    ] = None,
    datasets: Annotated[str | None, Opt(help="Comma-separated datasets (default digits).")] = None,
    seeds: Annotated[str | None, Opt(help="Comma-separated seeds (default 0).")] = None,
    rounds: Annotated[int | None, Opt(help="Rounds per cell (sets [run] rounds).")] = None,
    clients: Annotated[int | None, Opt(help="Clients per cell (sets [run] clients).")] = None,
    out: Annotated[
        Path | None, Opt(help="Compare folder (default compare/<spec name>); reruns resume it.")
    ] = None,
    jobs: Annotated[int | None, Opt(help="Cells at once (default: cores // cpus-per-cell).")] = None,
    cpus_per_cell: Annotated[int | None, Opt(help="CPU cores per cell's simulation (default 2).")] = None,
    no_report: Annotated[bool, Opt("--no-report", help="Write compare.csv only, no HTML report.")] = False,
) -> None:
    """Run a grid of models × defences (× datasets × seeds) with the auditor; write compare.csv."""
    from fedsim.grid.progress import CellProgress
    from fedsim.grid.spec import parse_list, parse_seeds

    try:
        lists = {
            "models": parse_list(models),
            "defences": parse_list(defences),
            "datasets": parse_list(datasets),
        }
        progress = CellProgress(console)
        with progress:
            frame = api.compare(
                spec, out=out, seeds=parse_seeds(seeds), rounds=rounds, clients=clients, jobs=jobs,
                cpus_per_cell=cpus_per_cell, report=not no_report, progress=progress, **lists,
            )  # fmt: skip
    except UserInputError as err:
        _fail(err)
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again: finished cells are kept, the rest continue")
        raise typer.Exit(130) from None
    attrs = frame.attrs
    ok = int((frame["status"] == "ok").sum())
    console.print(
        f"{ok} of {len(frame)} cells ok ({len(attrs['ran'])} run now, {len(attrs['skipped'])} done earlier) "
        f"-> {attrs['path'] / 'compare.csv'}",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip
    for _, row in frame[frame["status"] != "ok"].iterrows():
        console.print(f"{row['cell']}: failed: {row['error']}", markup=False, highlight=False, soft_wrap=True)
    if attrs.get("report") is not None:
        console.print(f"report: {attrs['report']}", markup=False, highlight=False)
    if attrs.get("report_error"):
        console.print(f"report not written: {attrs['report_error']}", markup=False, highlight=False)
    if ok < len(frame):
        raise typer.Exit(RunFailedError.exit_code)


@cli.command("attacks")
def list_attacks() -> None:
    """List the attacks an audit can run: what each does and what it works on."""
    width = max(len(name) for name in ATTACKS) + 2
    for name in available_attacks():
        entry = ATTACKS[name]
        typer.echo(f"{name:<{width}}{entry.description}")
        typer.echo(f"{'':<{width}}works on: {entry.works_on}")


# The run modes outside --defence, as `fedsim defences` lists them: (flag, what, knobs).
SERVER_DEFENCES = (
    (
        "--central-dp server|client",
        "Flower's DP-FedAvg wrappers: each update clipped to C (on the server, or on the client by "
        "Flower's clipping mod), N(0, (zC/n)²) added to the mean; client-level ε per round by Flower's "
        "RdpAccountant (fixed clipping).",
        (
            "noise-multiplier",
            "clipping-norm",
            "target-delta",
            "adaptive-clipping",
            "target-quantile",
            "clip-norm-lr",
        ),
    ),
    (
        "--secagg",
        "Flower's SecAgg+: the server sees only the sum of the sampled updates; the auditor attacks that.",
        ("secagg-shares", "secagg-threshold"),
    ),
)


@cli.command("defences")
def list_defences() -> None:
    """List the defences: the client-side ones of --defence, then central DP and SecAgg+."""
    width = max(len(name) for name in TRANSFORMATIONS) + 2
    for name in available_transformations():
        entry = TRANSFORMATIONS[name]
        typer.echo(f"{name:<{width}}{entry.description}")
        typer.echo(f"{'':<{width}}knobs: {_knobs_with_defaults(entry.knobs)}")
    typer.echo("\nserver side (flags of their own):")
    for flag, description, knobs in SERVER_DEFENCES:
        typer.echo(f"{flag}\n    {description}\n    knobs: {_knobs_with_defaults(knobs)}")


def _knobs_with_defaults(keys: Sequence[str]) -> str:
    return ", ".join(f"--{key} ({_knob_default(key)})" for key in keys)


def _knob_default(key: str) -> str:
    default = RunConfig.knob(key).default
    return str(default).lower() if isinstance(default, bool) else f"{default:g}"


@cli.command("datasets")
def list_datasets() -> None:
    """List the embedded datasets."""
    for name in available_datasets():
        typer.echo(name)


@cli.command("models")
def list_models() -> None:
    """List the model zoo, each with its options and their defaults (for --model-options)."""
    for name in available_models():
        options = ", ".join(map(str, model_options(name)))
        takes = f"takes {', '.join(modalities_taken(name))}; on {natural_dataset(name)}"
        typer.echo(f"{name}  {takes}" + (f"  ({options})" if options else ""))


@cli.command("report")
def report(
    compare_dir: Annotated[Path, typer.Argument(help="Folder `fedsim compare` wrote (has compare.csv).")],
    target_accuracy: Annotated[
        float | None,
        Opt(help="Accuracy (0..1) the summary's chosen setting must reach; default: the best minus 0.05."),
    ] = None,
) -> None:
    """(Re)write COMPARE_DIR/report.html, one offline page, and its figures from compare.csv."""
    try:
        path = write_report(compare_dir, target_accuracy)
    except UserInputError as err:
        _fail(err)
    typer.echo(f"wrote {path}")


def _fail(err: UserInputError) -> None:
    console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(UserInputError.exit_code)


def main() -> None:
    """The console script: typos in flags and values get the same one line as any bad input
    (click would draw a multi-line usage box), and Ctrl-C says how to continue."""
    try:
        code = cli(standalone_mode=False)
    except click.UsageError as err:
        where = err.ctx.command_path if err.ctx is not None else "fedsim"
        message = err.format_message().replace("\n", " ")
        console.print(
            f"error: {message}; see `{where} --help`", markup=False, highlight=False, soft_wrap=True
        )
        sys.exit(UserInputError.exit_code)
    except (click.Abort, KeyboardInterrupt):
        console.print("interrupted; continue a run from its last complete round with --resume runs/<name>")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
