"""A model's options, read from its builder's signature, so a family declares each option once.

A builder `f(spec, *, name: type = default, ...)` has the options its keyword parameters name;
users pass them as one string, `key=value` pairs separated by commas ("hidden=64,depth=3"), and
`parse_options` turns that into the builder's keyword arguments with the declared types.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


@dataclass(frozen=True)
class ModelOption:
    """One keyword option of a builder: its name, default and the type its default has."""

    name: str
    default: Any

    @property
    def type(self) -> type:
        return type(self.default)

    def convert(self, text: str, model: str) -> Any:
        """The option's value from its text; ValueError (naming the option and the fix) if not."""
        kind = self.type
        if kind is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
        else:
            try:
                value = kind(text)
            except ValueError:
                pass
            else:
                if kind is not float or math.isfinite(value):
                    return value
        raise ValueError(
            f"model option {self.name}={text!r} of {model!r} is not {_KIND[kind]}; "
            f"write e.g. {self.name}={self.default}"
        )

    def __str__(self) -> str:
        return f"{self.name}={self.default}"


_KIND = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a word"}


def builder_options(builder: Callable[..., Any]) -> tuple[ModelOption, ...]:
    """The keyword options of `builder` (every parameter after `spec` with a default)."""
    parameters = list(inspect.signature(builder).parameters.values())[1:]
    return tuple(
        ModelOption(p.name, p.default)
        for p in parameters
        if p.default is not inspect.Parameter.empty and type(p.default) in _KIND
    )


def parse_options(builder: Callable[..., Any], text: str, model: str) -> dict[str, Any]:
    """`"k=v,k2=v2"` as `builder`'s keyword arguments; ValueError naming the bad pair and the
    options `model` has, for an unknown key, a repeated key, a missing `=` or a bad value."""
    options = {option.name: option for option in builder_options(builder)}
    known = ", ".join(map(str, options.values()))
    values: dict[str, Any] = {}
    for pair in (part.strip() for part in text.split(",")):
        if not pair:
            continue
        key, sep, raw = (s.strip() for s in pair.partition("="))
        if not options:
            raise ValueError(f"model {model!r} takes no options; remove {pair!r}")
        if not sep or not key:
            raise ValueError(f"model option {pair!r} is not key=value; write e.g. {known.split(', ')[0]}")
        if key not in options:
            raise ValueError(f"model {model!r} has no option {key!r}; its options (defaults): {known}")
        if key in values:
            raise ValueError(f"model option {key!r} is given twice; give it once")
        values[key] = options[key].convert(raw, model)
    return values
