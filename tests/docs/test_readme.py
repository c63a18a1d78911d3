"""The README is the front door: short, the two setup commands CI relies on, and links that land."""

from __future__ import annotations

import re

from tests.support.runs import ROOT

README = ROOT / "README.md"
# Pages the site generates at build time (docs/gen/pages.py): a README link cannot point at them.
GENERATED = re.compile(r"docs/(reference/(?!index)|benchmarks/results)")


def test_the_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 200


def test_the_readme_keeps_the_two_setup_commands() -> None:
    text = README.read_text()
    assert re.search(r"^make demo +# ", text, re.MULTILINE) and re.search(
        r"^make test +# ", text, re.MULTILINE
    )
    assert "mkdocs serve" in text and "make docs" in text


def test_every_relative_link_of_the_readme_lands_on_a_file() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links into the docs"
    assert [link for link in local if GENERATED.match(link) or not (ROOT / link).exists()] == []
