"""The model zoo: one registry, one contract (`ZooModel`), one module per family.

Adding a family: write its module (a `ZooModel` subclass and a builder `f(spec, **options)`)
and add one line to `MODELS` below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.base import InputSpec, Modality, TrainingSettings, UnsupportedInputError, ZooModel
from models.classifiers import cnn6, cnn6_d, lenet, mlp
from models.convnets import cnn6_relu, convnet_bn, convnet_maxpool, resnet_mini

ModelBuilder = Callable[..., ZooModel]

MODELS: dict[str, ModelBuilder] = {
    "mlp": mlp,
    "lenet": lenet,
    "cnn6": cnn6,
    "cnn6-d": cnn6_d,
    "cnn6-relu": cnn6_relu,
    "convnet-bn": convnet_bn,
    "convnet-maxpool": convnet_maxpool,
    "resnet-mini": resnet_mini,
}


def available_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, spec: InputSpec, **options: Any) -> ZooModel:
    """Build a registered model for data described by `spec` (the dataset's own spec); raise
    KeyError naming the choices, UnsupportedInputError for a modality the family does not take."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}") from None
    model = builder(spec, **options)
    model.name = name
    return model


__all__ = [
    "MODELS",
    "InputSpec",
    "Modality",
    "TrainingSettings",
    "UnsupportedInputError",
    "ZooModel",
    "available_models",
    "build_model",
]
