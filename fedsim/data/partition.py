"""Split a labelled dataset among clients: IID, Dirichlet(α), pathological, long-tailed, and by
ranges of a per-sample covariate.

Each partitioner returns one index array per client. Every kept sample is in exactly one
partition, and the split depends only on the labels (or the covariate) and the seed. flwr-datasets has similar
partitioners but needs Hugging Face `datasets` (~500 MB); these are a few lines of numpy each.
"""

from __future__ import annotations

import numpy as np

from fedsim.config.partition_spec import PartitionSpec
from fedsim.errors import UserInputError


def partition(
    labels: np.ndarray, spec: PartitionSpec, covariate: np.ndarray | None = None
) -> list[np.ndarray]:
    """Split sample indices by `spec` (validated first); each array is sorted. `covariate` is the
    dataset's per-sample covariate (`Dataset.covariate_train`), which only "covariate" reads."""
    num_classes = int(labels.max()) + 1
    spec.validate(len(labels), num_classes)
    rng = np.random.default_rng(spec.seed)
    if spec.kind == "covariate":
        if covariate is None:
            raise UserInputError(
                "the covariate partitioner splits by a per-sample covariate, which this dataset does "
                "not carry; use a dataset that does (splash, splash-body) or another partitioner"
            )
        parts = covariate_ranges(covariate, spec.num_partitions)
    elif spec.kind == "iid":
        parts = iid(len(labels), spec.num_partitions, rng)
    elif spec.kind == "dirichlet":
        parts = dirichlet(labels, spec.num_partitions, spec.alpha, rng)
    elif spec.kind == "pathological":
        parts = pathological(labels, spec.num_partitions, spec.classes_per_client, rng)
    else:
        parts = longtail(labels, spec.num_partitions, spec.imbalance_ratio, rng)
    return [np.sort(p) for p in parts]


def iid(num_samples: int, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then cut into near-equal parts (sizes differ by at most one)."""
    return list(np.array_split(rng.permutation(num_samples), num_partitions))


def dirichlet(
    labels: np.ndarray, num_partitions: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, draw client shares from Dir(α) (Hsu et al. 2019).

    A small α can leave a client empty; each empty client then takes one sample from the
    largest client, so every client trains and the draw is otherwise untouched.
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    merged = [np.concatenate(p) for p in parts]
    for client in range(num_partitions):
        if len(merged[client]) == 0:
            donor = max(range(num_partitions), key=lambda c: len(merged[c]))
            merged[client], merged[donor] = merged[donor][-1:], merged[donor][:-1]
    return merged


def pathological(
    labels: np.ndarray, num_partitions: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client holds exactly `classes_per_client` classes (McMahan et al. 2017's shards).

    Classes are dealt round-robin over a shuffled class order, so all classes are used whenever
    clients × classes-per-client ≥ classes; each class is split evenly among its holders.
    """
    classes = rng.permutation(np.unique(labels))
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_partitions):
        for slot in range(classes_per_client):
            holders[int(classes[(client * classes_per_client + slot) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for cls, clients in holders.items():
        if not clients:
            continue
        members = rng.permutation(np.flatnonzero(labels == cls))
        for client, chunk in zip(clients, np.array_split(members, len(clients)), strict=True):
            parts[client].append(chunk)
    merged = [np.concatenate(p) for p in parts]
    empty = sum(len(p) == 0 for p in merged)
    if empty:
        smallest = min(int((labels == c).sum()) for c in classes)
        raise UserInputError(
            f"the pathological split leaves {empty} of {num_partitions} clients without samples "
            f"(the smallest class has {smallest} samples to share); use fewer clients or more "
            "classes per client"
        )
    return merged


def covariate_ranges(covariate: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """Client k gets the k-th of `num_partitions` equal-count, contiguous ranges of the covariate
    (e.g. the lowest impact heights go to client 0): a label shift whenever the labels follow
    the covariate. Ties keep index order, so the split needs no seed."""
    return list(np.array_split(np.argsort(covariate, kind="stable"), num_partitions))


def longtail_counts(class_sizes: np.ndarray, imbalance_ratio: float) -> np.ndarray:
    """Exponential profile n_c = n_max · ρ^(−c/(C−1)) (Cao et al. 2019), capped by what exists."""
    num_classes = len(class_sizes)
    decay = imbalance_ratio ** (-np.arange(num_classes) / max(num_classes - 1, 1))
    wanted = np.floor(class_sizes.min() * decay).astype(int)
    return np.maximum(np.minimum(wanted, class_sizes), 1)


def longtail(
    labels: np.ndarray, num_partitions: int, imbalance_ratio: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Subsample to a long-tailed global distribution (head class ρ× the tail), then split IID."""
    classes = np.unique(labels)
    sizes = np.array([(labels == c).sum() for c in classes])
    counts = longtail_counts(sizes, imbalance_ratio)
    kept = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in zip(classes, counts, strict=True)]
    )
    if len(kept) < num_partitions:
        raise UserInputError(
            f"the long-tailed subset keeps {len(kept)} samples for {num_partitions} clients; "
            "use fewer clients or a smaller imbalance ratio"
        )
    return [kept[p] for p in iid(len(kept), num_partitions, rng)]
