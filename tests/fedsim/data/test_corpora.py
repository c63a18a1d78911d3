"""The Debian text corpora: entries split as the files define them, labels as documented."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import corpora
from fedsim.errors import UserInputError
from tests.support.optional import require_fortunes, require_kjv


def test_fortunes_task_is_balanced_seeded_and_disjoint_from_the_public_corpus() -> None:
    require_fortunes()
    task = corpora.fortunes_task()
    counts = np.bincount(task.labels)
    assert counts.tolist() == [corpora.TASK_PER_CATEGORY] * len(corpora.TASK_CATEGORIES)
    assert all(t.strip() and "\n%\n" not in t for t in task.texts)
    assert corpora.fortunes_task().texts == task.texts
    assert corpora.fortunes_task(seed=1).texts != task.texts
    public = corpora.public_fortunes()
    others = [c for c in corpora.fortune_categories() if c not in corpora.TASK_CATEGORIES]
    assert len(others) >= 30 and not set(others) & set(corpora.TASK_CATEGORIES)
    assert len(public) == sum(len(corpora.fortune_entries(c)) for c in others) > 5000


def test_unknown_category_and_too_few_entries_name_the_fix() -> None:
    require_fortunes()
    with pytest.raises(UserInputError, match="unknown fortunes category 'nope'; choose from"):
        corpora.fortune_entries("nope")
    with pytest.raises(UserInputError, match="fewer than 5000"):
        corpora.fortunes_task(("computers", "work"), per_category=5000)


def test_missing_fortunes_names_the_install_command(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path)
    with pytest.raises(UserInputError, match="apt-get install -y fortunes"):
        corpora.fortune_categories()


def test_kjv_verses_and_testaments() -> None:
    require_kjv()
    verses = corpora.kjv_verses()
    assert len(verses) == 31102
    assert verses.texts[0] == "In the beginning God created the heaven and the earth."
    assert verses.labels[0] == 0 and verses.labels[-1] == 1
    assert np.all(np.diff(verses.labels) >= 0)  # one switch, at Matthew
    books = corpora.kjv_books()
    assert len(books) == 66 and books[0] == "Ge"


def test_text_datasets_share_a_public_vocabulary_and_feature_space() -> None:
    require_fortunes()
    from fedsim.data import load_dataset
    from fedsim.data.text import split_words

    tokens = load_dataset("fortunes")
    assert tokens.spec.modality == "tokens" and tokens.class_names == corpora.TASK_CATEGORIES
    assert np.bincount(tokens.y_train).tolist() == [464] * 6  # stratified 80 % of 580
    public_words = {w for text in corpora.public_fortunes() for w in split_words(text)}
    assert set(tokens.tokenizer.vocabulary.words[2:]) <= public_words  # no client word in it
    features = load_dataset("fortunes-lsa")
    assert features.spec.shape == (100,) and features.x_train.shape[0] == len(tokens.y_train)
    assert np.array_equal(features.y_train, tokens.y_train)


def test_kjv_dataset_is_balanced_by_testament() -> None:
    require_kjv()
    from fedsim.data import load_dataset

    data = load_dataset("kjv")
    assert np.bincount(data.y_train).tolist() == [2400, 2400]
    assert data.tokenizer.decode(data.x_test[0]).split()[0].isalpha()
