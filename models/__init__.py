"""The model zoo: one registry, one contract (`ZooModel`), one module per family.

Adding a family: write its module (a `ZooModel` subclass and a builder `f(spec, **options)`)
and add one line to `MODELS` below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.base import InputSpec, Modality, TrainingSettings, UnsupportedInputError, ZooModel
from models.classifiers import cnn6, cnn6_d, lenet, mlp
from models.cloze_transformer import cloze_transformer
from models.convnets import cnn6_relu, convnet_bn, convnet_maxpool, resnet_mini
from models.dam import dam_cnn, dam_mlp
from models.hybrid_contrastive import hybrid_psc, hybrid_sc
from models.learning_to_weight import learning_to_weight
from models.ledl import ledl
from models.minilm import minilm
from models.options import ModelOption, builder_options, parse_options
from models.protopnet import protopnet
from models.random_features import random_features
from models.smollm2 import smollm2
from models.splash_fnn import splash_fnn
from models.text_dnn import text_dnn
from models.ulmfit import ulmfit

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
    "splash-fnn": splash_fnn,
    "dam-mlp": dam_mlp,
    "dam-cnn": dam_cnn,
    "protopnet": protopnet,
    "hybrid-sc": hybrid_sc,
    "hybrid-psc": hybrid_psc,
    "text-dnn": text_dnn,
    "ledl": ledl,
    "ltw": learning_to_weight,
    "cloze": cloze_transformer,
    "ulmfit": ulmfit,
    "minilm": minilm,
    "smollm2": smollm2,
    "random-features": random_features,
}


def available_models() -> list[str]:
    return sorted(MODELS)


def _builder(name: str) -> ModelBuilder:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}") from None


def model_options(name: str) -> tuple[ModelOption, ...]:
    """The options a registered model takes, with their defaults (from its builder's signature)."""
    return builder_options(_builder(name))


def parse_model_options(name: str, text: str) -> dict[str, Any]:
    """`"key=value,..."` as keyword arguments of `name`'s builder; ValueError naming the fix."""
    return parse_options(_builder(name), text, name)


def build_model(name: str, spec: InputSpec, **options: Any) -> ZooModel:
    """Build a registered model for data described by `spec` (the dataset's own spec); raise
    KeyError naming the choices, UnsupportedInputError for a modality the family does not take."""
    model = _builder(name)(spec, **options)
    model.name = name
    return model


__all__ = [
    "MODELS",
    "InputSpec",
    "Modality",
    "ModelOption",
    "TrainingSettings",
    "UnsupportedInputError",
    "ZooModel",
    "available_models",
    "build_model",
    "model_options",
    "parse_model_options",
]
