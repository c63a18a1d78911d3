"""fedsim: a federated-learning simulator with privacy auditing.

    import fedsim
    result = fedsim.run({"clients": 4, "rounds": 3})   # -> fedsim.RunResult (DataFrames, paths)
    report = fedsim.audit(model="cnn6", dataset="photos")  # -> fedsim.AuditResult
    frame = fedsim.compare("benchmarks/leakage/compare_default.toml")  # -> DataFrame, one row per cell

The API is imported on first use, so `import fedsim.errors` (or any small module) does not
pull in Flower, Ray or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsim.api import AuditResult, RunResult, audit, compare, run
    from fedsim.config.run_config import RunConfig
    from fedsim.errors import RunFailedError, UserInputError

_EXPORTS = {
    "run": "fedsim.api",
    "audit": "fedsim.api",
    "RunResult": "fedsim.api",
    "AuditResult": "fedsim.api",
    "RunConfig": "fedsim.config.run_config",
    "UserInputError": "fedsim.errors",
    "compare": "fedsim.api",
    "RunFailedError": "fedsim.errors",
}
__all__ = [
    "AuditResult", "RunConfig", "RunFailedError", "RunResult", "UserInputError", "audit", "compare", "run",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
