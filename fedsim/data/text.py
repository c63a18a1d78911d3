"""Text on the data side of the contract: a word tokenizer and its vocabulary.

Token models see only ids; the dataset that made them keeps the tokenizer, so the same ids can
be turned back into words (to read a reconstructed sentence) and new text encoded the same way.
The vocabulary is built from the training split only, so test words it never saw map to <unk>.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

PAD = "<pad>"
UNKNOWN = "<unk>"
# Lower-case words and numbers, keeping inner apostrophes ("don't", "o'clock").
WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def split_words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class TokenCodec(Protocol):
    """What a token dataset keeps to read its ids back: fedsim's word tokenizer, or a pretrained
    model's own (`fedsim.data.pretrained_text`)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


@dataclass(frozen=True)
class Vocabulary:
    """Words by id: 0 is padding, 1 stands for every word outside the vocabulary."""

    words: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.words[:2] != (PAD, UNKNOWN) or len(set(self.words)) != len(self.words):
            raise ValueError(f"a vocabulary starts with {PAD!r}, {UNKNOWN!r} and lists each word once")
        object.__setattr__(self, "_ids", {word: i for i, word in enumerate(self.words)})

    @classmethod
    def build(
        cls, documents: Iterable[Sequence[str]], max_size: int | None = None, min_count: int = 1
    ) -> Vocabulary:
        """The most frequent words (ties alphabetical, so the ids do not depend on input order),
        at most `max_size` entries including the two specials."""
        counts = Counter(word for words in documents for word in words)
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[: max(max_size - 2, 0)]
        return cls((PAD, UNKNOWN, *ranked))

    def __len__(self) -> int:
        return len(self.words)

    def id_of(self, word: str) -> int:
        return self._ids.get(word, 1)


@dataclass(frozen=True)
class WordTokenizer:
    """Text to fixed-length int64 id rows: split into words, look up, cut or pad to `length`."""

    vocabulary: Vocabulary
    length: int

    @classmethod
    def fit(
        cls, texts: Iterable[str], length: int, max_vocabulary: int | None = None, min_count: int = 1
    ) -> WordTokenizer:
        vocabulary = Vocabulary.build((split_words(t) for t in texts), max_vocabulary, min_count)
        return cls(vocabulary, length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        ids = np.zeros((len(texts), self.length), dtype=np.int64)  # 0 = <pad>
        for row, text in enumerate(texts):
            words = split_words(text)[: self.length]
            ids[row, : len(words)] = [self.vocabulary.id_of(w) for w in words]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Words of one id row, padding dropped (out-of-vocabulary words read <unk>)."""
        return " ".join(self.vocabulary.words[int(i)] for i in ids if int(i) != 0)
