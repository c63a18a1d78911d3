"""The model zoo: one registry, one contract (`ZooModel`), one module per family.

Adding a family: write its module (a `ZooModel` subclass and a builder `f(spec, **options)`)
and add one line to `MODELS` below: the builder, the modalities it takes, its natural dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModelEntry:
    """One registered family: its builder, the modalities it takes (checked before the builder
    runs, so a refusal is cheap and names them) and its natural dataset, the one `fedsim audit
    --model NAME` uses without --dataset (a name in fedsim's dataset registry)."""

    build: ModelBuilder
    takes: tuple[Modality, ...]
    dataset: str


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(
        mlp,
        (
            "image",
            "features",
        ),
        "digits",
    ),
    "lenet": ModelEntry(lenet, ("image",), "photos"),
    "cnn6": ModelEntry(cnn6, ("image",), "photos"),
    "cnn6-d": ModelEntry(cnn6_d, ("image",), "photos"),
    "cnn6-relu": ModelEntry(cnn6_relu, ("image",), "photos"),
    "convnet-bn": ModelEntry(convnet_bn, ("image",), "photos"),
    "convnet-maxpool": ModelEntry(convnet_maxpool, ("image",), "photos"),
    "resnet-mini": ModelEntry(resnet_mini, ("image",), "photos"),
    "splash-fnn": ModelEntry(splash_fnn, ("image",), "splash"),
    "dam-mlp": ModelEntry(
        dam_mlp,
        (
            "image",
            "features",
        ),
        "fashion-mnist",
    ),
    "dam-cnn": ModelEntry(dam_cnn, ("image",), "fashion-mnist"),
    "protopnet": ModelEntry(protopnet, ("image",), "fashion-mnist"),
    "hybrid-sc": ModelEntry(hybrid_sc, ("image",), "fashion-mnist"),
    "hybrid-psc": ModelEntry(hybrid_psc, ("image",), "fashion-mnist"),
    "text-dnn": ModelEntry(
        text_dnn,
        (
            "features",
            "image",
        ),
        "fortunes-lsa",
    ),
    "ledl": ModelEntry(
        ledl,
        (
            "image",
            "features",
        ),
        "digits",
    ),
    "ltw": ModelEntry(learning_to_weight, ("tokens",), "fortunes"),
    "cloze": ModelEntry(cloze_transformer, ("tokens",), "fortunes"),
    "ulmfit": ModelEntry(ulmfit, ("tokens",), "fortunes"),
    "minilm": ModelEntry(minilm, ("tokens",), "fortunes-minilm"),
    "smollm2": ModelEntry(smollm2, ("tokens",), "fortunes-smollm2"),
    "random-features": ModelEntry(
        random_features,
        (
            "image",
            "features",
        ),
        "digits",
    ),
}


def available_models() -> list[str]:
    return sorted(MODELS)


def _entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(available_models())}") from None


def modalities_taken(name: str) -> tuple[Modality, ...]:
    """The input modalities a family takes (its registry line)."""
    return _entry(name).takes


def natural_dataset(name: str) -> str:
    """The dataset a family is meant for (its paper's data, or the closest embedded one)."""
    return _entry(name).dataset


def model_options(name: str) -> tuple[ModelOption, ...]:
    """The options a registered model takes, with their defaults (from its builder's signature)."""
    return builder_options(_entry(name).build)


def parse_model_options(name: str, text: str) -> dict[str, Any]:
    """`"key=value,..."` as keyword arguments of `name`'s builder; ValueError naming the fix."""
    return parse_options(_entry(name).build, text, name)


def build_model(name: str, spec: InputSpec, **options: Any) -> ZooModel:
    """Build a registered model for data described by `spec` (the dataset's own spec); raise
    KeyError naming the choices, UnsupportedInputError for a modality the family does not take."""
    entry = _entry(name)
    spec.require(*entry.takes, model=name)
    model = entry.build(spec, **options)
    model.name = name
    return model


__all__ = [
    "MODELS",
    "InputSpec",
    "Modality",
    "ModelEntry",
    "ModelOption",
    "TrainingSettings",
    "UnsupportedInputError",
    "ZooModel",
    "available_models",
    "build_model",
    "modalities_taken",
    "model_options",
    "natural_dataset",
    "parse_model_options",
]
