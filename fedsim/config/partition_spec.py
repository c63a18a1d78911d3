"""How a dataset is split among clients: a value the run config builds and the partitioners read."""

from __future__ import annotations

from dataclasses import dataclass

from fedsim.errors import UserInputError

PARTITIONERS = ("iid", "dirichlet", "pathological", "longtail", "covariate")


@dataclass(frozen=True)
class PartitionSpec:
    """How to split: the partitioner's name, the client count and that partitioner's parameter."""

    kind: str = "iid"
    num_partitions: int = 10
    alpha: float = 0.5
    classes_per_client: int = 2
    imbalance_ratio: float = 10.0
    seed: int = 0

    def validate(self, num_samples: int, num_classes: int) -> None:
        """Raise UserInputError for a spec that cannot split `num_samples` samples."""
        if self.kind not in PARTITIONERS:
            raise UserInputError(
                f"unknown partitioner {self.kind!r}; choose one of: {', '.join(PARTITIONERS)}"
            )
        if self.num_partitions < 1:
            raise UserInputError(
                f"clients must be at least 1 (got {self.num_partitions}); pass --clients 1 or more"
            )
        if self.num_partitions > num_samples:
            raise UserInputError(
                f"{self.num_partitions} clients but only {num_samples} training samples; "
                f"use at most {num_samples} clients"
            )
        if self.kind == "dirichlet" and not self.alpha > 0:
            raise UserInputError(
                f"alpha must be > 0 (got {self.alpha}); small values such as 0.1 give skewed clients"
            )
        if self.kind == "pathological" and not 1 <= self.classes_per_client <= num_classes:
            raise UserInputError(
                f"classes per client must be between 1 and {num_classes} (got {self.classes_per_client}); "
                f"pass --classes-per-client 1 to {num_classes}"
            )
        if self.kind == "longtail" and not self.imbalance_ratio >= 1:
            raise UserInputError(
                f"imbalance ratio must be >= 1 (got {self.imbalance_ratio}); "
                "1 means balanced, 100 very skewed"
            )
