"""Every ```python block of the documentation pages runs, as a reader would run it.

A page's blocks run top to bottom in one namespace (a later block may use an earlier one's
names), in a fresh working folder, so the runs and grids they write land there. The examples are
kept small (digits, 2 clients, 1–2 rounds). A block that genuinely cannot run in a test starts with
the comment `# not run: <why>`; today that is the 25-cell default grid of `fedsim compare` (half
an hour). Shell blocks (```bash) are not run here: the `flwr run .` recipe is run verbatim by
tests/e2e/test_flwr_run_recipe.py.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from tests.support.docs import NOT_RUN, doc_pages, fenced_blocks
from tests.support.runs import ROOT

PAGES = [page for page in doc_pages() if fenced_blocks(page, "python")]
# Pages whose examples start federations (Ray, a child process per run): well over 20 s each.
FEDERATING = ("fedsim.run(", "fedsim.compare(")


def _param(page: Path) -> object:
    slow = any(b.runs and any(call in b.code for call in FEDERATING) for b in fenced_blocks(page, "python"))
    return pytest.param(
        page, id=str(page.relative_to(ROOT / "docs")), marks=[pytest.mark.slow] if slow else []
    )


def test_the_pages_with_python_examples_are_found() -> None:
    names = {page.name for page in PAGES}
    assert {"audit-a-model.md", "run-with-the-auditor.md", "compare.md"} <= names


def test_a_block_that_is_not_run_says_why() -> None:
    skipped = [b for page in PAGES for b in fenced_blocks(page, "python") if not b.runs]
    assert skipped, f"no block uses the `{NOT_RUN}` convention; drop this test with the convention"
    assert all(b.reason for b in skipped), [str(b) for b in skipped if not b.reason]


def test_the_not_run_convention_is_read_from_the_first_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n```python\n# not run: needs a SuperLink\nconnect()\n```\n\n"
        "```python\nx = 1  # not run: only a comment here\n```\n\n```bash\necho hi\n```\n"
    )
    first, second = fenced_blocks(page, "python")
    assert (first.runs, first.reason, first.line) == (False, "needs a SuperLink", 3)
    assert (second.runs, second.reason) == (True, "")
    assert [b.language for b in fenced_blocks(page)] == ["python", "python", "bash"]


@pytest.mark.parametrize("page", [_param(page) for page in PAGES])
def test_the_python_examples_of_a_page_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    ran = 0
    for block in fenced_blocks(page, "python"):
        if not block.runs:
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block.code, str(block), "exec"), namespace)
        ran += 1
        print(f"{block}:\n{printed.getvalue()}")
    assert ran, f"{page} has no python block that runs"
