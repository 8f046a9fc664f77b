"""Datasets: raw readers, download, preprocessing + cache, and the sequence container."""

from .prepare import DATASETS, PrepareOptions, build_sequences, prepare_dataset
from .sequences import SPLITS, SequenceData

__all__ = ["DATASETS", "SPLITS", "PrepareOptions", "SequenceData", "build_sequences", "prepare_dataset"]
