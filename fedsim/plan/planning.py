"""Every check a run needs before anything is written: config, data, partition, model, strategy."""

from __future__ import annotations

import torch

from attacks.registry import available_attacks
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import dataset_for
from fedsim.data.partition import partition
from fedsim.data.registry import DATASETS, available_datasets, datasets_holding
from fedsim.errors import UserInputError
from fedsim.plan.gradient_free import check_gradient_free
from fedsim.plan.secagg import check_secagg, check_secagg_model
from fedsim.strategy.aggregators import check_strategy
from fedsim.strategy.central_dp import check_central_dp
from fedsim.training.defences import check_client_defences
from fedsim.training.local import training_settings
from fedsim.training.run_model import build_run_model
from fedsim.training.transforms import check_transformation_names
from models import InputSpec, UnsupportedInputError, available_models, build_model, modalities_taken


def validate_plan(config: RunConfig) -> None:
    """Raise UserInputError (one line: problem and fix) for anything that would fail mid-run."""
    config.validate()
    check_model_name(config.model)
    check_attack_names(config.attack_names())  # also without --audit: a typo stored now bites later
    check_transformation_names(config.transformation_names())
    data = dataset_for(config)
    partition(data.y_train, config.partition_spec(), data.covariate_train)
    check_strategy(config)
    check_central_dp(config)
    check_secagg(config)
    check_model_fits(
        config.model, config.dataset, data.spec, torch.from_numpy(data.x_train[:1]), config.model_options
    )
    check_model_optimiser(config, data.spec)
    check_gradient_free(config, data.spec)
    check_client_defences(config, data.spec)
    check_secagg_model(config, data.spec)


def check_model_fits(
    model_name: str, dataset: str, spec: InputSpec, sample: torch.Tensor, options: str = ""
) -> None:
    """Build the model (with its options) for the dataset's spec and run one sample through it: a
    family that does not take this modality, an option it rejects, or layers that do not fit this
    shape, fail here and not on a client."""
    try:
        model = build_run_model(model_name, spec, options)
    except UnsupportedInputError as err:
        fitting = ", ".join(_models_taking(spec)) or "none of the zoo"
        raise UserInputError(
            f"{err} ({dataset!r} holds {spec.modality}); pick a model that does: {fitting}"
        ) from None

    try:
        with torch.no_grad():
            model(sample)
    except (RuntimeError, ValueError) as err:
        hint = "try --image-size 32" if spec.modality == "image" else "pick another model"
        raise UserInputError(
            f"model {model_name!r} does not fit {dataset!r} {spec.modality} inputs of shape {spec.shape} "
            f"({str(err).splitlines()[0]}); {hint}"
        ) from None


def check_model_optimiser(config: RunConfig, spec: InputSpec) -> None:
    """Build the model's round-1 optimiser with the run's training settings: a family that refuses
    them (e.g. Nesterov's momentum with --momentum 0) fails here and not on every client. A family
    not trained by gradients builds no optimiser."""
    model = build_run_model(config.model, spec, config.model_options)
    if not model.trained_by_gradients:
        return
    try:
        model.configure_optimizer(training_settings(config), 1)
    except ValueError as err:
        raise UserInputError(f"model {config.model!r}: {str(err).splitlines()[0]}") from None


def _models_taking(spec: InputSpec) -> list[str]:
    fitting = []
    for name in available_models():
        try:
            build_model(name, spec)
        except UnsupportedInputError:
            continue
        except (RuntimeError, ValueError):
            pass  # takes the modality, maybe not this shape
        fitting.append(name)
    return fitting


def check_model_name(name: str) -> None:
    if name not in available_models():
        raise UserInputError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}")


def check_model_takes(model: str, dataset: str) -> None:
    """Refuse, before loading anything, a dataset whose modality the model family does not take,
    naming the datasets it does take."""
    if dataset not in DATASETS:
        raise UserInputError(f"unknown dataset {dataset!r}; choose one of: {', '.join(available_datasets())}")
    taken, held = modalities_taken(model), DATASETS[dataset].modality
    if held not in taken:
        raise UserInputError(
            f"model {model!r} takes {' or '.join(taken)} inputs, not {held} ({dataset!r}); "
            f"pass --dataset one of: {', '.join(datasets_holding(taken))}"
        )


def check_attack_names(names: list[str]) -> None:
    unknown = sorted(set(names) - set(available_attacks()))
    if unknown or not names:
        raise UserInputError(
            f"unknown attack(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from: {', '.join(available_attacks())}"
        )
