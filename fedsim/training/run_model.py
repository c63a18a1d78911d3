"""The run's model as the user configured it: the zoo's builder with the run's `--model-options`."""

from __future__ import annotations

from typing import Any

from fedsim.errors import UserInputError
from models import InputSpec, UnsupportedInputError, ZooModel, build_model, parse_model_options
from models.pretrained import PretrainedUnavailableError


def build_run_model(model: str, spec: InputSpec, options: str = "", **fixed: Any) -> ZooModel:
    """Build `model` for `spec` with its options parsed from `options` ("key=value,..."); a bad
    option is a user error naming the model's options. `fixed` are options the caller sets
    itself (the audit's `--head`), which `options` must not repeat."""
    try:
        parsed = parse_model_options(model, options)
    except ValueError as err:
        raise UserInputError(str(err)) from None
    repeated = sorted(set(parsed) & set(fixed))
    if repeated:
        raise UserInputError(
            f"model option {repeated[0]!r} has its own flag here; pass --{repeated[0]} instead"
        )
    try:
        return build_model(model, spec, **parsed, **fixed)
    except UnsupportedInputError:
        raise  # the caller names the models that do take this data
    except PretrainedUnavailableError as err:  # its weights' package: one line with the install
        raise UserInputError(f"model {model!r} cannot be built: {err}") from None
    except ValueError as err:  # a builder refusing a value (e.g. a width of 0) or this shape
        given = f" with options {options!r}" if options else ""
        raise UserInputError(f"model {model!r} cannot be built{given}: {err}; see `fedsim models`") from None
