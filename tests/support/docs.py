"""Helpers for tests of the documentation site: its pages' fenced code blocks (with the convention
that marks a Python block as not run), and a strict build of the site into a folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.runs import ROOT

DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"
# A Python block that genuinely cannot run in a test (a 30-minute grid, a deployment) starts with
# this comment and says why, e.g. `# not run: the 25-cell default grid takes 30 minutes`.
NOT_RUN = "# not run:"
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page: its language, its code and the line it starts on."""

    page: Path
    language: str
    code: str
    line: int

    @property
    def runs(self) -> bool:
        return not self.code.lstrip().startswith(NOT_RUN)

    @property
    def reason(self) -> str:
        """Why a not-run block does not run (empty for a block that runs)."""
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first.removeprefix(NOT_RUN).strip() if not self.runs else ""

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path, language: str | None = None) -> list[Block]:
    """The page's fenced blocks in order, only those of `language` when given (the first word of
    the fence's info string: ```python, ```bash)."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        words = match.group("info").strip().split()
        lang = words[0] if words else ""
        if language is None or lang == language:
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(page, lang, match.group("body"), line))
    return blocks


def doc_pages() -> list[Path]:
    """Every Markdown page written by hand under docs/ (generated pages exist only in a build)."""
    return sorted(p for p in DOCS.rglob("*.md") if "gen" not in p.relative_to(DOCS).parts)


def build_site(site_dir: Path, config: Path = ROOT / "mkdocs.yml") -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` of `config` into `site_dir`, its output captured (the MkDocs 2 and
    end-of-life notices some plugins print are silenced: they are not warnings about the site)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
