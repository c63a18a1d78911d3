"""Small Markdown helpers shared by the renderers: table cells and tables."""

from __future__ import annotations

import html
import inspect
from collections.abc import Iterable, Sequence
from typing import Any


def cell(value: Any) -> str:
    """One table cell: text on one line, pipes escaped, `<`, `>` and `&` escaped outside code spans
    (help texts say `runs/<name>`), None and "" shown as an en dash."""
    if value is None or value == "":
        return "–"
    parts = " ".join(str(value).split()).split("`")
    text = "`".join(html.escape(part, quote=False) if i % 2 == 0 else part for i, part in enumerate(parts))
    return text.replace("|", "\\|")


def code(value: Any) -> str:
    """A value as inline code (backticks inside are replaced, pipes escaped)."""
    text = " ".join(str(value).split()).replace("`", "'")
    return f"`{text}`".replace("|", "\\|")


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def first_paragraph(obj: Any) -> str:
    """The first paragraph of an object's docstring, on one line ("" without a docstring)."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())
