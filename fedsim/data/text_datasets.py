"""Text datasets for federated runs, built so that every client shares one vocabulary and one
feature space that no client's text went into.

A federated text task needs the same token ids (and, for feature models, the same projection) on
every client. Fitting them on the pooled training texts would hand the server, through the
model's shape and the vocabulary file, the words the clients wrote. fedsim fits them on a
*public corpus of the same domain* instead, disjoint from the task:

- `fortunes` (tokens): six balanced fortunes categories (`corpora.TASK_CATEGORIES`); the
  vocabulary is the most frequent words of the other 30+ categories. A client's rare word maps to
  <unk>, so the vocabulary reveals nothing about a client; what the *gradients* reveal is the
  audit's question.
- `fortunes-lsa` (features): the same texts as TF-IDF over that public vocabulary, projected by a
  truncated SVD (LSA) fitted on the public corpus too, then standardised by public statistics.
- `kjv` (tokens): verses labelled Old (0) or New (1) Testament, balanced; the vocabulary comes
  from the verses not drawn into the task.

Splits are stratified 80/20 and fixed by SPLIT_SEED, like the image datasets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import train_test_split

from fedsim.data.corpora import LabelledTexts, fortunes_task, kjv_verses, public_fortunes
from fedsim.data.dataset import SPLIT_SEED, Dataset
from fedsim.data.text import Vocabulary, WordTokenizer, split_words
from models import InputSpec

FORTUNE_LENGTH = 48  # tokens per entry: 90 % of the task's entries are shorter
KJV_LENGTH = 40
VOCABULARY_SIZE = 5000
LSA_COMPONENTS = 100
KJV_PER_TESTAMENT = 3000


def split_task(task: LabelledTexts) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    x_train, x_test, y_train, y_test = train_test_split(
        list(task.texts), task.labels, test_size=0.2, stratify=task.labels, random_state=SPLIT_SEED
    )
    return (x_train, y_train), (x_test, y_test)


def encoded_task(name: str, task: LabelledTexts, tokenizer: Any, spec: InputSpec) -> Dataset:
    """The task's split (`split_task`) as token data, both halves encoded by `tokenizer`."""
    (train_texts, y_train), (test_texts, y_test) = split_task(task)
    return Dataset(
        name,
        tokenizer.encode(train_texts),
        y_train.astype(np.int64),
        tokenizer.encode(test_texts),
        y_test.astype(np.int64),
        spec,
        tokenizer,
        class_names=task.names,
    )


def _token_dataset(name: str, task: LabelledTexts, public: tuple[str, ...], length: int) -> Dataset:
    vocabulary = Vocabulary.build((split_words(t) for t in public), VOCABULARY_SIZE)
    spec = InputSpec.tokens(length, len(vocabulary), len(task.names))
    return encoded_task(name, task, WordTokenizer(vocabulary, length), spec)


def fortunes() -> Dataset:
    """Debian's fortunes as word-token sequences, labelled by their fortune file (the topic)."""
    return _token_dataset("fortunes", fortunes_task(), public_fortunes(), FORTUNE_LENGTH)


def fortunes_lsa() -> Dataset:
    """TF-IDF → LSA features of the fortunes task, every transform fitted on the public corpus."""
    public = public_fortunes()
    tfidf = TfidfVectorizer(analyzer=split_words, max_features=VOCABULARY_SIZE, sublinear_tf=True)
    svd = TruncatedSVD(LSA_COMPONENTS, random_state=SPLIT_SEED)
    public_features = svd.fit_transform(tfidf.fit_transform(public))
    mean, scale = public_features.mean(axis=0), public_features.std(axis=0) + 1e-8
    task = fortunes_task()
    (train_texts, y_train), (test_texts, y_test) = split_task(task)

    def features(texts: list[str]) -> np.ndarray:
        return ((svd.transform(tfidf.transform(texts)) - mean) / scale).astype(np.float32)

    spec = InputSpec.features(LSA_COMPONENTS, len(task.names), value_range=None)
    return Dataset(
        "fortunes-lsa",
        features(train_texts),
        y_train.astype(np.int64),
        features(test_texts),
        y_test.astype(np.int64),
        spec,
        class_names=task.names,
    )


def kjv() -> Dataset:
    """Verses of the King James Bible (Debian's bible-kjv) as word tokens, labelled by testament."""
    verses = kjv_verses()
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(verses.labels == label), KJV_PER_TESTAMENT, replace=False)
                for label in (0, 1)
            ]
        )
    )
    task = LabelledTexts(tuple(verses.texts[i] for i in chosen), verses.labels[chosen], verses.names)
    rest = np.setdiff1d(np.arange(len(verses)), chosen)
    return _token_dataset("kjv", task, tuple(verses.texts[i] for i in rest), KJV_LENGTH)
