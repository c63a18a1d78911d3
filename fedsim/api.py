"""fedsim's Python API: run a federation or audit a model from a script or a notebook.

    import fedsim
    result = fedsim.run({"clients": 4, "rounds": 3}, on_round=lambda r, m: print(r, m))
    result.server[["round", "eval_accuracy"]]          # the global model's learning curve
    report = fedsim.audit(model="cnn6", dataset="photos", samples=2)
    report.security, report.summary                     # per-layer ranks, per-attack scores

`fedsim run` and `fedsim audit` are thin layers over `run` and `audit`. Bad input raises
`UserInputError` before anything is written; a run that stops early raises `RunFailedError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from audits.architecture.report import ArchitectureReport
from audits.architecture.standalone import audit_model
from audits.scoring.engine import AUDIT_COLUMNS, AuditRow
from audits.scoring.summary import summarise_audit
from audits.security.metric import SecurityReport
from fedsim.config.run_config import RunConfig
from fedsim.data import load_dataset
from fedsim.errors import UserInputError
from fedsim.launch import PathLike, RunResult, checked_path, run
from fedsim.plan.planning import check_attack_names, check_model_name, check_model_takes
from fedsim.store.audit_folder import check_output_folder, load_weights, write_audit
from fedsim.training.run_model import build_run_model
from models import InputSpec, UnsupportedInputError, ZooModel, natural_dataset
from models import model_options as model_options_of

__all__ = ["AuditResult", "RunResult", "audit", "compare", "run"]


@dataclass(frozen=True)
class AuditResult:
    """One model's leakage: the per-layer security table and each attack on each sample."""

    security: pd.DataFrame | None  # one row per Linear/Conv layer: unknowns, rank, deficit, ...
    security_report: SecurityReport | None  # the same with its score; None when not applicable
    security_error: str | None  # why the security metric does not apply to this model
    architecture: ArchitectureReport  # layer-wise metric, end-to-end rank, PSNR ceiling vs attacks
    rows: pd.DataFrame  # audit.csv's rows: one per (sample, attack)
    audit_rows: list[AuditRow]  # the same rows as the engine made them
    summary: pd.DataFrame  # one row per attack: mean PSNR / SSIM, label score, seconds
    inputs: np.ndarray  # the attacked samples, (N, C, H, W)
    labels: np.ndarray
    reconstructions: dict[str, list[np.ndarray | None]]  # per attack, per sample (None: declined)
    settings: dict[str, Any]
    path: Path | None = None  # the output folder, when `out` was given
    files: tuple[Path, ...] = field(default=())  # report.json, audit.csv, reconstructions.png


def _audited_model(model: str, spec: InputSpec, options: str, head: str) -> ZooModel:
    """The audited model with its options; `head` applies to the families that have one."""
    has_head = any(option.name == "head" for option in model_options_of(model))
    if not has_head and head != "ce":
        raise UserInputError(f"model {model!r} has no choice of head; drop --head {head}")
    return build_run_model(model, spec, options, **({"head": head} if has_head else {}))


def audit(
    *,
    model: str = "cnn6",
    dataset: str | None = None,
    samples: int = 4,
    attacks: str | Sequence[str] = "layerwise",
    weights: PathLike | None = None,
    seed: int = 0,
    out: PathLike | None = None,
    image_size: int = 0,
    head: str = "ce",
    gradient_noise: float = 0.0,
    model_options: str = "",
) -> AuditResult:
    """Audit one model's leakage without a federation: the security metric (per-layer rank of
    the layer-wise inversion systems) and each attack on the exact batch-1 gradient of
    `samples` test samples of `dataset`, drawn with `seed`.

    dataset: None takes the model family's natural dataset (`fedsim models` lists it); a dataset
        of a modality the family does not take is refused naming the datasets it does take.

    weights: a .safetensors file (e.g. a run checkpoint) to load; default a seeded initial model.
    out: a new folder to write report.json, audit.csv and reconstructions.png to; None keeps
        everything in memory. head: "ce" (softmax with bias) or "logistic" (R-GAP's one logit).
    gradient_noise: std of seeded Gaussian noise added to each entry of the gradient the attacks
        see (0: exact); the PSNR ceiling is computed at it (at 0: at the float32 rounding of a
        one-step weight delta, see `audits.architecture.report.ROUNDING_LEARNING_RATE`).
    model_options: the model's options as `fedsim run --model-options` takes them.
    """
    if dataset is None:  # the family's own data: the model's name is checked first
        check_model_name(model)
        dataset = natural_dataset(model)
    names = [a.strip() for a in attacks.split(",")] if isinstance(attacks, str) else list(attacks)
    names = [name for name in names if name]
    check_attack_names(names)
    checked = (
        ("model", model), ("model-options", model_options), ("dataset", dataset),
        ("image-size", image_size), ("seed", seed),
    )  # fmt: skip
    for key, value in checked:
        RunConfig.knob(key).check(value)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserInputError(f"--samples must be at least 1 (got {samples}); pass e.g. --samples 4")
    _check_gradient_noise(gradient_noise)
    check_model_name(model)
    check_model_takes(model, dataset)
    data = load_dataset(dataset, image_size or None)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        try:
            net = _audited_model(model, data.spec, model_options, head)
        except UnsupportedInputError as err:  # finer than a modality: a pretrained vocabulary
            raise UserInputError(str(err)) from None
    weights_path = None if weights is None else checked_path(weights, "weights")
    if weights_path is not None:
        load_weights(net, weights_path)
    folder = None if out is None else checked_path(out, "out")
    if folder is not None:
        check_output_folder(folder)
    chosen = np.random.default_rng(seed).choice(
        len(data.y_test), size=min(samples, len(data.y_test)), replace=False
    )
    inputs, labels = data.x_test[chosen], data.y_test[chosen]
    result = audit_model(
        net,
        inputs,
        labels,
        names,
        seed=seed,
        sample_ids=chosen,
        gradient_noise=gradient_noise,
        decode=None if data.tokenizer is None else data.tokenizer.decode,
    )
    settings = {
        "model": model,
        "dataset": dataset,
        "image_size": image_size,
        "head": head,
        "model_options": model_options,
        "seed": seed,
        "weights": str(weights_path) if weights_path else None,
        "samples": [int(i) for i in chosen],
        "gradient_noise": float(gradient_noise),
    }
    if folder is not None:
        write_audit(folder, result, settings)
    report = result.security.report
    return AuditResult(
        security=report.to_frame() if report is not None else None,
        security_report=report,
        security_error=None if report is not None else result.security.note,
        architecture=result.architecture,
        rows=pd.DataFrame([row.to_dict() for row in result.rows], columns=list(AUDIT_COLUMNS)),
        audit_rows=result.rows,
        summary=pd.DataFrame(summarise_audit(result.rows)),
        inputs=inputs,
        labels=labels,
        reconstructions=result.reconstructions,
        settings=settings,
        path=folder,
        files=tuple(sorted(folder.iterdir())) if folder is not None else (),
    )


def compare(
    spec: PathLike | Mapping[str, Any] | None = None,
    *,
    out: PathLike | None = None,
    models: Sequence[str] | None = None,
    defences: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    rounds: int | None = None,
    clients: int | None = None,
    jobs: int | None = None,
    cpus_per_cell: int | None = None,
    report: bool | Callable[[Path], Path] = True,
    progress: Any = None,
) -> pd.DataFrame:
    """Run a grid of models × defences (× datasets × seeds): one short federation with the
    auditor per cell, each cell's final model's security report, one row per cell (see
    `fedsim.grid.row.COLUMNS`) in `<out>/compare.csv`, returned as a DataFrame.

    spec: a TOML file or a mapping (`fedsim.grid.spec` documents the keys); None = the
        defaults. models/defences/datasets/seeds replace the spec's lists; rounds/clients set
        its `[run]` keys. out: the compare folder (default `compare/<spec name>`); running again
        on it resumes: finished cells are kept, not recomputed.
    jobs: cells at once (default cores // cpus_per_cell); cpus_per_cell: cores per simulation.
    report: True writes the HTML report at the end where `fedsim.grid.report` exists; a
        callable `report(compare_dir) -> path` is called instead; False writes none.
    progress: a `fedsim.grid.progress.CellProgress` (None: no progress display).

    Bad specs raise UserInputError before any cell runs; a failing cell is a `failed` row.
    The frame's `attrs` hold the folder (`path`) and which cells ran, were skipped, failed.
    """
    from fedsim.grid import runner
    from fedsim.grid import spec as grid_spec

    values: Mapping[str, Any]
    if spec is None:
        values = {}
    elif isinstance(spec, Mapping):
        values = spec
    else:
        values = grid_spec.read_spec_file(checked_path(spec, "compare spec"))
    overrides = {"models": models, "defences": defences, "datasets": datasets, "seeds": seeds,
                 "rounds": rounds, "clients": clients}  # fmt: skip
    for key, value in overrides.items():
        if isinstance(value, str):
            overrides[key] = grid_spec.parse_list(value)
    grid = grid_spec.build_grid(grid_spec.merge_overrides(values, overrides))
    refused = grid_spec.check_cells(grid)
    folder = checked_path(out, "--out") if out is not None else Path("compare") / grid.name
    writer = _report_writer() if report is True else (report or None)
    outcome = runner.run_grid(
        grid, folder, jobs=jobs, cpus_per_cell=cpus_per_cell or runner.CPUS_PER_CELL, progress=progress,
        report=writer, refused=refused,
    )  # fmt: skip
    from fedsim.grid.row import COMPARE_FILE

    frame = pd.read_csv(folder / COMPARE_FILE)  # typed as every reader of the file sees it
    frame.attrs.update(
        path=outcome.path, ran=outcome.ran, skipped=outcome.skipped, failed=outcome.failed,
        report=outcome.report, report_error=outcome.report_error,
    )  # fmt: skip
    return frame


def _report_writer() -> Callable[[Path], Path] | None:
    """`fedsim.grid.report.write_report` where that module is installed, else None."""
    try:
        from fedsim.grid.report import write_report  # type: ignore[import-not-found]
    except ModuleNotFoundError as err:
        if err.name != "fedsim.grid.report":
            raise  # the module is there but one of its own imports is missing: a real error
        return None
    return write_report


def _check_gradient_noise(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise UserInputError(
            f"--gradient-noise must be a finite number >= 0 (got {value}); pass 0 for the exact "
            "gradient or a noise std such as 0.001"
        )
