"""`fedsim`: run federations (and, from later issues, audits) from the shell.

User mistakes print one line, `error: <problem>; <fix>`, and exit with code 2 before anything is
written; tracebacks are kept for bugs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attacks.registry import available_attacks
from audits.report import summarise_audit
from audits.standalone import audit_model
from fedsim.config.run_config import RunConfig, field_name
from fedsim.data import available_datasets, load_dataset
from fedsim.errors import UserInputError
from fedsim.federation.planning import check_attack_names, check_model_name, validate_plan
from fedsim.federation.server_app import FederationPlan
from fedsim.federation.simulation import SimulationError, check_ray_address, simulate
from fedsim.store.audit_folder import check_output_folder, load_weights, write_audit
from fedsim.store.run_store import RunStore
from fedsim.strategy.auditing import AUDIT_FILE
from models import InputSpec, available_models, build_model

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
    momentum: Annotated[float | None, Opt(help="Client SGD momentum (0 for plain SGD).")] = None,
    proximal_mu: Annotated[float | None, Opt(help="FedProx proximal weight μ.")] = None,
    server_learning_rate: Annotated[float | None, Opt(help="FedAdam server learning rate η.")] = None,
    num_malicious: Annotated[int | None, Opt(help="Krum: tolerated malicious clients.")] = None,
    trim_beta: Annotated[float | None, Opt(help="FedTrimmedAvg: share trimmed at each end.")] = None,
    seed: Annotated[int | None, Opt(help="Seed for data split, init, sampling and training.")] = None,
    max_local_steps: Annotated[int | None, Opt(help="Cap local SGD steps (1 + batch 1 = FedSGD).")] = None,
    audit: Annotated[bool | None, Opt("--audit/--no-audit", help="Attack client updates each round.")] = None,
    audit_attacks: Annotated[str | None, Opt(help="Comma-separated attacks (see `fedsim attacks`).")] = None,
    audit_clients: Annotated[int | None, Opt(help="Clients audited per round (0 = all sampled).")] = None,
    runs_dir: Annotated[Path, Opt(help="Folder that holds run directories.")] = Path("runs"),
    resume: Annotated[Path | None, Opt(help="Continue runs/<name> from its last complete round.")] = None,
    stop_after: Annotated[int | None, Opt(help="Stop after this round (resume later).")] = None,
    cpus: Annotated[int | None, Opt(help="CPU cores for the simulation (default: all).")] = None,
    ray_address: Annotated[str | None, Opt(help="Join a running Ray cluster, e.g. 'auto'.")] = None,
    verbose: Annotated[bool, Opt(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run a federated simulation and write runs/<name>/ (metrics, checkpoints, plot)."""
    overrides = {field_name(k): v for k, v in locals().items() if k in _CONFIG_FLAGS and v is not None}
    try:
        if stop_after is not None and stop_after < 1:
            raise UserInputError(f"--stop-after must be at least 1 (got {stop_after}); pass a round number")
        if cpus is not None and cpus < 1:
            raise UserInputError(f"--cpus must be at least 1 (got {cpus}); leave it out to use every core")
        if ray_address:
            check_ray_address(ray_address)
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
            console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    rows = store.read_rows()
    final = [r for r in rows if r["stage"] == "server"][-1]
    console.print(
        f"round {final['round']}: server test accuracy {float(final['eval_accuracy']):.4f}, "
        f"loss {float(final['eval_loss']):.4f} -> {store.path}"
    )
    if run_config.audit and (store.path / AUDIT_FILE).exists():
        _print_audit_summary(store.path / AUDIT_FILE)


def _print_audit_summary(path: Path) -> None:
    table = Table("attack", "updates", "images", "mean PSNR", "max PSNR", "labels", title=f"audit: {path}")
    summary = summarise_audit(path)
    for s in summary:
        table.add_row(s["attack"], str(s["updates"]), str(s["reconstructed"]), _fmt(s["mean_psnr"], ".1f"),
                      _fmt(s["max_psnr"], ".1f"), _fmt(s["label_accuracy"], ".2f"))  # fmt: skip
    out = Console()
    out.print(table)
    for s in summary:
        if s["note"]:
            out.print(f"{s['attack']}: {s['note']}", markup=False, highlight=False)


_CONFIG_FLAGS = {
    "name", "dataset", "image_size", "model", "strategy", "partitioner", "alpha", "classes_per_client",
    "imbalance_ratio", "clients", "fraction_train", "fraction_evaluate", "rounds", "local_epochs",
    "batch_size", "learning_rate", "momentum", "proximal_mu", "server_learning_rate", "num_malicious",
    "trim_beta",
    "seed", "max_local_steps", "audit", "audit_attacks", "audit_clients",
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


@cli.command()
def audit(
    model: Annotated[str, Opt(help=f"One of: {', '.join(available_models())}.")] = "cnn6",
    data: Annotated[str, Opt(help=f"Samples to attack, from: {', '.join(available_datasets())}.")] = "photos",
    image_size: Annotated[int, Opt(help="Resize images to N×N; 0 keeps them.")] = 0,
    head: Annotated[str, Opt(help="'ce' (softmax with bias) or 'logistic' (R-GAP's one logit).")] = "ce",
    weights: Annotated[Path | None, Opt(help="Model weights (.safetensors, e.g. a run checkpoint).")] = None,
    samples: Annotated[int, Opt(help="Samples to attack (one batch-1 gradient each).")] = 4,
    attacks: Annotated[
        str, Opt(help=f"Comma-separated, from: {', '.join(available_attacks())}.")
    ] = "layerwise",
    seed: Annotated[int, Opt(help="Seed for the initial weights and the sample choice.")] = 0,
    out: Annotated[Path | None, Opt(help="Output folder (default runs/audit-<model>-<data>-<time>).")] = None,
) -> None:
    """Audit one model's leakage: per-layer rank table, security score, attacks on N samples."""
    try:
        names = [a.strip() for a in attacks.split(",") if a.strip()]
        check_attack_names(names)
        if samples < 1:
            raise UserInputError(f"--samples must be at least 1 (got {samples}); pass e.g. --samples 4")
        check_model_name(model)
        dataset = load_dataset(data, image_size or None)
        torch.manual_seed(seed)
        try:
            net = build_model(model, InputSpec(dataset.sample_shape, dataset.num_classes), head=head)
        except ValueError as err:
            raise UserInputError(str(err)) from None
        if weights is not None:
            load_weights(net, weights)
        folder = out or Path("runs") / f"audit-{model}-{data}-{time.strftime('%Y%m%d-%H%M%S')}"
        check_output_folder(folder)
    except UserInputError as err:
        _fail(err)
    chosen = np.random.default_rng(seed).choice(
        len(dataset.y_test), size=min(samples, len(dataset.y_test)), replace=False
    )
    inputs, labels = dataset.x_test[chosen], dataset.y_test[chosen]
    result, images = audit_model(net, inputs, labels, names, seed=seed)
    settings = {
        "model": model,
        "data": data,
        "image_size": image_size,
        "head": head,
        "seed": seed,
        "weights": str(weights) if weights else None,
        "samples": [int(i) for i in chosen],
    }
    write_audit(folder, result, inputs, images, settings)
    out_console = Console()
    if result.security is not None:
        out_console.print(result.security.to_table(), markup=False, highlight=False)
    else:
        out_console.print(f"security metric: not applicable ({result.security_error})")
    table = Table("attack", "samples", "mean PSNR (dB)", "mean SSIM", "label acc.", "s / sample")
    for attack_name, s in result.summary().items():
        cells = [_fmt(s[k], f) for k, f in (("mean_psnr", ".1f"), ("mean_ssim", ".3f"),
                                            ("label_accuracy", ".2f"), ("mean_seconds", ".2f"))]  # fmt: skip
        table.add_row(attack_name, str(s["samples"]), *cells)
    out_console.print(table)
    out_console.print(f"wrote {folder}/report.json, audit.csv, reconstructions.png")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@cli.command("attacks")
def list_attacks() -> None:
    """List the attacks an audit can run."""
    for name in available_attacks():
        typer.echo(name)


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
