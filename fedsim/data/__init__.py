"""Data: the embedded datasets (no downloads), their train/test splits and input specs."""

from fedsim.data.dataset import Dataset
from fedsim.data.registry import available_datasets, load_dataset
from fedsim.data.text import Vocabulary, WordTokenizer

__all__ = ["Dataset", "Vocabulary", "WordTokenizer", "available_datasets", "load_dataset"]
