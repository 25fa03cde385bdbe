"""Datasets: download/prepare into memory-mapped token arrays, and resumable seeded samplers."""
from .registry import DATASETS, Codec, get_dataset_info, load_codec, prepare
from .sampler import RandomBatchSampler, eval_batches
from .stream import DatasetMeta, PreparedDataset

__all__ = ["DATASETS", "Codec", "DatasetMeta", "PreparedDataset", "RandomBatchSampler", "eval_batches",
           "get_dataset_info", "load_codec", "prepare"]
