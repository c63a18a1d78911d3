"""Data: the embedded datasets (no downloads) and their train/test splits."""

from fedsim.data.registry import Dataset, available_datasets, load_dataset

__all__ = ["Dataset", "available_datasets", "load_dataset"]
