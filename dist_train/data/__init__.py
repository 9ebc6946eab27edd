"""Data: a dataset registry, the sharded batch sampler and the DataLoaders.

Importing the package registers the built-in datasets (fashion_mnist, digits, synthetic_images,
shakespeare); their data is only read when `build_datasets` is called.
"""

from dist_train.data import image as _image  # noqa: F401  (registers the image datasets)
from dist_train.data import text as _text  # noqa: F401  (registers the language datasets)
from dist_train.data.loader import build_eval_loader, build_train_loader
from dist_train.data.registry import (
    DataInfo,
    InMemoryDataset,
    build_datasets,
    dataset_names,
    register_dataset,
)
from dist_train.data.sampler import ShardedBatchSampler

__all__ = [
    "DataInfo",
    "InMemoryDataset",
    "ShardedBatchSampler",
    "build_datasets",
    "build_eval_loader",
    "build_train_loader",
    "dataset_names",
    "register_dataset",
]
