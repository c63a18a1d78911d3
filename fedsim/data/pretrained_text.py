"""The fortunes task in a pretrained model's own token ids.

A pretrained transformer reads only the ids of the tokenizer it was trained with, so each one gets
its own copy of the `fortunes` task (the same texts, the same stratified 80/20 split by
SPLIT_SEED, the same six topic labels):

- `fortunes-minilm`: MiniLM's WordPiece ids, `[CLS] … [SEP]` then `[PAD]` (id 0) to 48 tokens;
- `fortunes-smollm2`: SmolLM2's BPE ids, cut to 32 tokens (a federated round of the 135 M model
  must fit on two cores) and padded with `<|endoftext|>` (id 0), which no fortune contains.
  The language model's target is the next token; the labels (topics) are kept for partitioning.

The vocabularies are the pretrained models' own, fixed before any client existed: like fedsim's
public-corpus vocabulary, they reveal nothing about a client's text. The spec names the tokenizer
(`InputSpec.vocabulary`), so a pretrained model refuses ids from any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.data.corpora import fortunes_task
from fedsim.data.dataset import Dataset
from fedsim.data.text_datasets import FORTUNE_LENGTH, encoded_task
from fedsim.errors import UserInputError
from models import InputSpec
from models.pretrained import PretrainedUnavailableError, minilm_tokenizer, smollm2_tokenizer

SMOLLM2_LENGTH = 32
SMOLLM2_PAD = 0  # <|endoftext|>: never inside a fortune, so it marks padding only


@dataclass(frozen=True)
class PretrainedTokenizer:
    """A transformers tokenizer as fedsim's `TokenCodec`: whitespace-normalised text to fixed-
    length int64 rows (cut, then padded with `pad_id`), and rows back to text without padding
    or the tokenizer's special tokens."""

    tokenizer: Any
    length: int
    pad_id: int
    special_tokens: bool  # wrap each text as the model was trained ([CLS] … [SEP] for BERT)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows = self.tokenizer(
            [" ".join(text.split()) for text in texts],
            add_special_tokens=self.special_tokens,
            truncation=True,
            max_length=self.length,
        )["input_ids"]
        ids = np.full((len(texts), self.length), self.pad_id, dtype=np.int64)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = tokens
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        kept = [int(i) for i in ids if int(i) != self.pad_id]
        return str(self.tokenizer.decode(kept, skip_special_tokens=True)).strip()


def _pretrained_fortunes(name: str, vocabulary: str, codec_of: Any) -> Dataset:
    try:
        codec: PretrainedTokenizer = codec_of()
    except PretrainedUnavailableError as err:
        raise UserInputError(f"dataset {name!r} needs a pretrained tokenizer: {err}") from None
    task = fortunes_task()
    spec = InputSpec.tokens(codec.length, codec.vocab_size, len(task.names), vocabulary)
    return encoded_task(name, task, codec, spec)


def minilm_codec() -> PretrainedTokenizer:
    tokenizer = minilm_tokenizer()
    return PretrainedTokenizer(tokenizer, FORTUNE_LENGTH, int(tokenizer.pad_token_id), special_tokens=True)


def smollm2_codec() -> PretrainedTokenizer:
    return PretrainedTokenizer(smollm2_tokenizer(), SMOLLM2_LENGTH, SMOLLM2_PAD, special_tokens=False)


def fortunes_minilm() -> Dataset:
    """The fortunes task tokenized for the pretrained MiniLM encoder (its own WordPiece ids)."""
    return _pretrained_fortunes("fortunes-minilm", "minilm", minilm_codec)


def fortunes_smollm2() -> Dataset:
    """The fortunes task tokenized for the pretrained SmolLM2 (its own BPE ids)."""
    return _pretrained_fortunes("fortunes-smollm2", "smollm2", smollm2_codec)
