"""Readers for the text corpora that Debian packages ship: `fortunes` and the KJV Bible.

Both are plain files on disk, nothing is downloaded. A missing package raises `UserInputError`
naming its `apt-get install` command, so a run stops with one line and a test can skip with it.

- fortunes: 43 category files under /usr/share/games/fortunes/, entries separated by a line
  holding only `%`; the label of an entry is its file name.
- KJV: the `bible` program of package bible-kjv prints every verse as `Ge1:1 In the beginning…`;
  the book abbreviation and the testament (Old up to Malachi, New from Matthew) are the labels.

The default text task (`TASK_CATEGORIES`) takes six fortunes categories of 600+ entries each with
distinct topics, balanced to the same count; the remaining categories are the *public* corpus of
the same domain (`public_fortunes`), from which a federated text task fits its shared vocabulary
and feature space without looking at any client's text.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedsim.errors import UserInputError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_INSTALL = "apt-get install -y fortunes"
KJV_INSTALL = "apt-get install -y bible-kjv"
# Six topics with 582-1050 entries each; balanced to `TASK_PER_CATEGORY` entries apiece.
TASK_CATEGORIES = ("computers", "men-women", "politics", "science", "songs-poems", "work")
TASK_PER_CATEGORY = 580
# Files that are no prose (pictures drawn in characters) or nearly empty.
UNUSABLE_CATEGORIES = frozenset({"art", "ascii-art", "translate-me", "pratchett"})
NEW_TESTAMENT_FIRST_BOOK = "Mat"


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with int64 labels in [0, len(names)) and the label names."""

    texts: tuple[str, ...]
    labels: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def _require_fortunes() -> Path:
    if not (FORTUNES_DIR / "computers").is_file():
        raise UserInputError(f"the fortunes corpus is not installed; install it with: {FORTUNES_INSTALL}")
    return FORTUNES_DIR


def fortune_categories() -> list[str]:
    """Every category file of the installed corpus that holds prose, sorted."""
    folder = _require_fortunes()
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.suffix and not p.is_symlink() and p.name not in UNUSABLE_CATEGORIES
    )


@lru_cache(maxsize=64)
def fortune_entries(category: str) -> tuple[str, ...]:
    """The non-empty entries of one category file, in file order (whitespace trimmed)."""
    path = _require_fortunes() / category
    if not path.is_file():
        raise UserInputError(
            f"unknown fortunes category {category!r}; choose from: {', '.join(fortune_categories())}"
        )
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = (entry.strip() for entry in text.replace("\r\n", "\n").split("\n%\n"))
    return tuple(e for e in entries if e and e != "%")


def fortunes_task(
    categories: tuple[str, ...] = TASK_CATEGORIES, per_category: int = TASK_PER_CATEGORY, seed: int = 0
) -> LabelledTexts:
    """A balanced classification task: `per_category` entries drawn (seeded) from each category,
    labelled by the category's position in `categories`."""
    texts: list[str] = []
    labels: list[int] = []
    rng = np.random.default_rng(seed)
    for label, category in enumerate(categories):
        entries = fortune_entries(category)
        if len(entries) < per_category:
            raise UserInputError(
                f"fortunes category {category!r} has {len(entries)} entries, fewer than {per_category}; "
                "choose a larger category or fewer entries per category"
            )
        chosen = np.sort(rng.choice(len(entries), size=per_category, replace=False))
        texts += [entries[i] for i in chosen]
        labels += [label] * per_category
    return LabelledTexts(tuple(texts), np.asarray(labels, dtype=np.int64), tuple(categories))


def public_fortunes(exclude: tuple[str, ...] = TASK_CATEGORIES) -> tuple[str, ...]:
    """Every entry of the categories outside the task: a public corpus of the same domain."""
    return tuple(e for c in fortune_categories() if c not in exclude for e in fortune_entries(c))


@lru_cache(maxsize=1)
def _kjv() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(book abbreviation, verse text) of every verse, as `bible-kjv`'s own program prints them."""
    program = shutil.which("bible")
    if program is None:
        raise UserInputError(f"the KJV Bible is not installed; install it with: {KJV_INSTALL}")
    output = subprocess.run(
        [program, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    books: list[str] = []
    texts: list[str] = []
    for line in output.splitlines():
        reference, _, verse = line.partition(" ")
        if verse.strip():
            books.append(reference.split(":")[0].rstrip("0123456789"))
            texts.append(verse.strip())
    return tuple(books), tuple(texts)


def kjv_verses() -> LabelledTexts:
    """All 31,102 verses, labelled by testament (0 Old, 1 New)."""
    books, texts = _kjv()
    labels = np.zeros(len(texts), dtype=np.int64)
    labels[books.index(NEW_TESTAMENT_FIRST_BOOK) :] = 1
    return LabelledTexts(texts, labels, ("old testament", "new testament"))


def kjv_books() -> list[str]:
    """The book abbreviations in canonical order (Ge, Ex, …, Re)."""
    return list(dict.fromkeys(_kjv()[0]))
