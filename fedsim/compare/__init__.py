"""`fedsim compare`: a grid of models × defences (× datasets × seeds), one short audited
federation per cell, one row per cell in `compare.csv`.

    import fedsim
    frame = fedsim.compare("benchmarks/compare_default.toml", out="compare/default")

`fedsim.compare` is this package and is also callable: calling it runs `fedsim.api.compare`
(the package holds the pieces: `spec` parses and checks a grid, `runner` runs and resumes its
cells, `row` reads a finished run directory back into a row, `security` computes a cell's
security report). Importing it stays light: torch and Flower load on the first call.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    """The package object, callable as `fedsim.compare(spec, ...)`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from fedsim.api import compare

        return compare(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
