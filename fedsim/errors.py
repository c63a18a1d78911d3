"""User-facing errors: one line that names the problem and the fix, exit code 2."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user (config, flags, missing optional data). Shown without a traceback."""

    exit_code = 2
