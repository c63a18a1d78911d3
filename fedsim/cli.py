"""`fedsim`: run federations (and, from later issues, audits) from the shell.

User mistakes print one line, `error: <problem>; <fix>`, and exit with code 2 before anything is
written; tracebacks are kept for bugs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsim.config import RunConfig
from fedsim.data import available_datasets
from fedsim.errors import UserInputError
from fedsim.planning import validate_plan
from fedsim.server_app import FederationPlan
from fedsim.simulation import SimulationError, simulate
from fedsim.store import RunStore
from models import available_models

cli = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated-learning simulator with privacy auditing."
)
console = Console(stderr=True)

Opt = typer.Option


@cli.command()
def run(
    name: Annotated[str | None, Opt(help="Run name: the folder under --runs-dir.")] = None,
    config: Annotated[Path | None, Opt(help="TOML file of config keys (flags override it).")] = None,
    dataset: Annotated[str | None, Opt(help=f"One of: {', '.join(available_datasets())}.")] = None,
    image_size: Annotated[
        int | None, Opt(help="Resize images to N×N (e.g. 32 for CNN6); 0 keeps them.")
    ] = None,
    model: Annotated[str | None, Opt(help=f"One of: {', '.join(available_models())}.")] = None,
    strategy: Annotated[
        str | None, Opt(help="fedavg, fedprox, fedadam, krum, fedmedian, fedtrimmedavg.")
    ] = None,
    partitioner: Annotated[str | None, Opt(help="iid, dirichlet, pathological, longtail.")] = None,
    alpha: Annotated[float | None, Opt(help="Dirichlet concentration (smaller = more skewed).")] = None,
    classes_per_client: Annotated[int | None, Opt(help="Classes per client (pathological).")] = None,
    imbalance_ratio: Annotated[float | None, Opt(help="Head/tail class ratio (longtail).")] = None,
    clients: Annotated[int | None, Opt(help="Number of clients (virtual SuperNodes).")] = None,
    fraction_train: Annotated[float | None, Opt(help="Share of clients trained per round.")] = None,
    fraction_evaluate: Annotated[
        float | None, Opt(help="Share of clients evaluating per round (0 = none).")
    ] = None,
    rounds: Annotated[int | None, Opt(help="Federated rounds.")] = None,
    local_epochs: Annotated[int | None, Opt(help="Local epochs per round.")] = None,
    batch_size: Annotated[int | None, Opt(help="Local batch size.")] = None,
    learning_rate: Annotated[float | None, Opt(help="Client SGD learning rate.")] = None,
    proximal_mu: Annotated[float | None, Opt(help="FedProx proximal weight μ.")] = None,
    server_learning_rate: Annotated[float | None, Opt(help="FedAdam server learning rate η.")] = None,
    num_malicious: Annotated[int | None, Opt(help="Krum: tolerated malicious clients.")] = None,
    trim_beta: Annotated[float | None, Opt(help="FedTrimmedAvg: share trimmed at each end.")] = None,
    seed: Annotated[int | None, Opt(help="Seed for data split, init, sampling and training.")] = None,
    runs_dir: Annotated[Path, Opt(help="Folder that holds run directories.")] = Path("runs"),
    resume: Annotated[Path | None, Opt(help="Continue runs/<name> from its last complete round.")] = None,
    stop_after: Annotated[int | None, Opt(help="Stop after this round (resume later).")] = None,
    cpus: Annotated[int | None, Opt(help="CPU cores for the simulation (default: all).")] = None,
    ray_address: Annotated[str | None, Opt(help="Join a running Ray cluster, e.g. 'auto'.")] = None,
    verbose: Annotated[bool, Opt(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run a federated simulation and write runs/<name>/ (metrics, checkpoints, plot)."""
    overrides = {k: v for k, v in locals().items() if k in _CONFIG_FLAGS and v is not None}
    if "clients" in overrides:
        overrides["num_clients"] = overrides.pop("clients")
    try:
        if stop_after is not None and stop_after < 1:
            raise UserInputError(f"--stop-after must be at least 1 (got {stop_after})")
        if resume is not None:
            if overrides or config is not None:
                raise UserInputError(
                    "--resume continues a run with its saved config; drop the other run flags"
                )
            store = RunStore.open(resume)
            run_config = store.config
            validate_plan(run_config)
        else:
            base = RunConfig.from_file(config) if config else RunConfig()
            run_config = base.replace(**overrides)
            validate_plan(run_config)
            store = RunStore.create(runs_dir, run_config)
    except UserInputError as err:
        _fail(err)
    plan = FederationPlan(run_config, store, stop_after=stop_after)
    done = store.last_complete_round() or 0
    if done >= plan.last_round():
        console.print(f"{store.path}: already at round {done} of {run_config.rounds}; nothing to do")
        return
    with _round_progress(plan, done) as progress:
        plan.on_round = progress
        try:
            simulate(plan, cpus=cpus, ray_address=ray_address, verbose=verbose)
        except SimulationError as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(1) from None
    rows = store.read_rows()
    final = [r for r in rows if r["stage"] == "server"][-1]
    console.print(
        f"round {final['round']}: server test accuracy {float(final['eval_accuracy']):.4f}, "
        f"loss {float(final['eval_loss']):.4f} -> {store.path}"
    )


_CONFIG_FLAGS = {
    "name", "dataset", "image_size", "model", "strategy", "partitioner", "alpha", "classes_per_client",
    "imbalance_ratio", "clients", "fraction_train", "fraction_evaluate", "rounds", "local_epochs",
    "batch_size", "learning_rate", "proximal_mu", "server_learning_rate", "num_malicious", "trim_beta",
    "seed",
}  # fmt: skip


class _round_progress:  # noqa: N801 - used as a context manager, reads like a function
    """A rich progress bar over rounds, advanced by the ServerApp's per-round callback."""

    def __init__(self, plan: FederationPlan, done: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not sys.stderr.isatty(),
        )
        self.task = self.progress.add_task(
            plan.config.name, total=plan.last_round(), completed=done, status=""
        )
        self.plain = not sys.stderr.isatty()

    def __enter__(self) -> _round_progress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, server_round: int, metrics: dict[str, float]) -> None:
        status = f"acc {metrics['accuracy']:.3f} loss {metrics['loss']:.3f}"
        self.progress.update(self.task, completed=server_round, status=status)
        if self.plain:
            console.print(f"round {server_round}: {status}")


@cli.command("datasets")
def list_datasets() -> None:
    """List the embedded datasets."""
    for name in available_datasets():
        typer.echo(name)


@cli.command("models")
def list_models() -> None:
    """List the model zoo."""
    for name in available_models():
        typer.echo(name)


def _fail(err: UserInputError) -> None:
    console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(UserInputError.exit_code)


def main() -> None:
    cli()
