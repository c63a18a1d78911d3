"""Every check a run needs before anything is written: config, data, partition, model, strategy."""

from __future__ import annotations

import torch

from attacks.registry import available_attacks
from fedsim.config.run_config import RunConfig
from fedsim.data.clients import dataset_for
from fedsim.data.partition import partition
from fedsim.errors import UserInputError
from fedsim.strategy.aggregators import check_strategy
from models import InputSpec, available_models, build_model


def validate_plan(config: RunConfig) -> None:
    """Raise UserInputError (one line: problem and fix) for anything that would fail mid-run."""
    config.validate()
    check_model_name(config.model)
    if config.audit:
        check_attack_names(config.attack_names())
    data = dataset_for(config)
    partition(data.y_train, config.partition_spec())
    check_strategy(config)
    spec = InputSpec(data.sample_shape, data.num_classes)
    try:
        model = build_model(config.model, spec)
        with torch.no_grad():
            model(torch.from_numpy(data.x_train[:1]))
    except (RuntimeError, ValueError) as err:
        raise UserInputError(
            f"model {config.model!r} does not fit {config.dataset!r} inputs of shape {spec.shape} "
            f"({str(err).splitlines()[0]}); try --image-size 32"
        ) from None


def check_model_name(name: str) -> None:
    if name not in available_models():
        raise UserInputError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}")


def check_attack_names(names: list[str]) -> None:
    unknown = sorted(set(names) - set(available_attacks()))
    if unknown or not names:
        raise UserInputError(
            f"unknown attack(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from: {', '.join(available_attacks())}"
        )
