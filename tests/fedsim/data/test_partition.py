"""Partitioners: every kept sample in exactly one client, the promised label mix, seeded."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.config.partition_spec import PartitionSpec
from fedsim.data import load_dataset
from fedsim.data.partition import longtail_counts, partition
from fedsim.errors import UserInputError

DIGITS = load_dataset("digits").y_train

specs = st.builds(
    PartitionSpec,
    kind=st.sampled_from(["iid", "dirichlet", "pathological", "longtail"]),
    num_partitions=st.integers(1, 60),
    alpha=st.floats(0.05, 100),
    classes_per_client=st.integers(1, 10),
    imbalance_ratio=st.floats(1, 100),
    seed=st.integers(0, 2**31),
)


@settings(max_examples=60, deadline=None)
@given(spec=specs)
def test_every_kept_sample_lands_in_exactly_one_partition(spec: PartitionSpec) -> None:
    parts = partition(DIGITS, spec)
    assert len(parts) == spec.num_partitions
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "a sample is in two partitions"
    assert joined.min() >= 0 and joined.max() < len(DIGITS)
    if spec.kind in ("iid", "dirichlet") or (
        spec.kind == "pathological" and spec.num_partitions * spec.classes_per_client >= 10
    ):
        assert len(joined) == len(DIGITS), "a sample was dropped"
    assert min(len(p) for p in parts) > 0, "a client got no data"


@settings(max_examples=30, deadline=None)
@given(spec=specs)
def test_same_seed_same_split(spec: PartitionSpec) -> None:
    first, second = partition(DIGITS, spec), partition(DIGITS, spec)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_iid_sizes_differ_by_at_most_one_and_mix_all_labels() -> None:
    parts = partition(DIGITS, PartitionSpec("iid", 7, seed=1))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(np.unique(DIGITS[p])) == 10 for p in parts)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_pathological_gives_exactly_k_classes(k: int) -> None:
    parts = partition(DIGITS, PartitionSpec("pathological", 10, classes_per_client=k, seed=2))
    assert [len(np.unique(DIGITS[p])) for p in parts] == [k] * 10


def test_dirichlet_skew_follows_alpha() -> None:
    """Small α concentrates each client on few classes; large α approaches IID."""

    def mean_dominant_share(alpha: float) -> float:
        parts = partition(DIGITS, PartitionSpec("dirichlet", 10, alpha=alpha, seed=3))
        return float(np.mean([np.bincount(DIGITS[p]).max() / len(p) for p in parts]))

    assert mean_dominant_share(0.05) > 0.6
    assert mean_dominant_share(1000.0) < 0.2
    first = partition(DIGITS, PartitionSpec("dirichlet", 10, alpha=0.3, seed=4))
    other_seed = partition(DIGITS, PartitionSpec("dirichlet", 10, alpha=0.3, seed=5))
    assert [len(p) for p in first] != [len(p) for p in other_seed]


def test_longtail_class_counts_decay_exponentially_to_the_ratio() -> None:
    parts = partition(DIGITS, PartitionSpec("longtail", 4, imbalance_ratio=10, seed=0))
    counts = np.bincount(DIGITS[np.concatenate(parts)], minlength=10)
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.1)
    assert all(np.diff(counts) <= 0)
    expected = longtail_counts(np.bincount(DIGITS), 10)
    assert counts.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PartitionSpec("dirichlet", 5, alpha=0.0), "alpha must be > 0"),
        (PartitionSpec("iid", len(DIGITS) + 1), "use at most"),
        (PartitionSpec("pathological", 5, classes_per_client=11), "classes per client"),
        (PartitionSpec("longtail", 5, imbalance_ratio=0.5), "imbalance ratio"),
        (PartitionSpec("shards", 5), "unknown partitioner"),
    ],
)
def test_bad_specs_are_user_errors(spec: PartitionSpec, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        partition(DIGITS, spec)


def test_pathological_split_that_would_leave_clients_empty_is_refused() -> None:
    with pytest.raises(UserInputError, match=r"leaves .* clients without samples"):
        partition(DIGITS, PartitionSpec("pathological", 1437, classes_per_client=1))


def test_covariate_partition_gives_each_client_a_contiguous_range_of_it() -> None:
    """On the splash drops (labels = impact height above the threshold) the ranges are a label
    shift: the lowest heights never splash, the highest always do."""
    data = load_dataset("splash")
    heights = data.covariate_train
    parts = partition(data.y_train, PartitionSpec("covariate", 4), heights)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(heights)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for lower, upper in itertools.pairwise(parts):
        assert heights[lower].max() <= heights[upper].min()
    splash_share = [float(data.y_train[p].mean()) for p in parts]
    assert splash_share[0] == 0.0 and splash_share[-1] == 1.0
    assert splash_share == sorted(splash_share)


def test_covariate_partition_needs_a_dataset_that_carries_one() -> None:
    with pytest.raises(UserInputError, match="does not carry"):
        partition(DIGITS, PartitionSpec("covariate", 3))
