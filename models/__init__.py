"""The model zoo: one registry, one interface (`ZooModel`), one module per family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.base import InputSpec, ZooModel
from models.classifiers import cnn6, cnn6_d, lenet, mlp

ModelBuilder = Callable[..., ZooModel]

MODELS: dict[str, ModelBuilder] = {
    "mlp": mlp,
    "lenet": lenet,
    "cnn6": cnn6,
    "cnn6-d": cnn6_d,
}


def available_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, spec: InputSpec, **options: Any) -> ZooModel:
    """Build a registered model for data of shape `spec`; raise KeyError naming the choices."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}") from None
    return builder(spec, **options)


__all__ = ["MODELS", "InputSpec", "ZooModel", "available_models", "build_model"]
