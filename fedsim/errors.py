"""User-facing errors: one line that names the problem and the fix; exit code 2 for bad input,
1 for a run that failed."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user (config, flags, missing optional data). Shown without a traceback."""

    exit_code = 2


class RunFailedError(RuntimeError):
    """A federation stopped before its last round (a client or server error, divergence, a crash).

    The message is one line naming the cause; `details` holds the simulation's log or traceback
    where there is one, for bugs."""

    exit_code = 1

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details
