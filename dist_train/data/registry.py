"""Dataset registry, the dataset description (`DataInfo`) and the in-memory dataset type.

A dataset is registered by name with a builder `fn(cfg) -> (train_ds, eval_ds, DataInfo)`, where
`cfg` is the `data` config section (duck-typed: only attribute access is used).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from dist_train.data.transforms import apply_preprocessing

TASKS = ("classification", "language_model")


@dataclass(frozen=True)
class DataInfo:
    """What a model and the loss need to know about a dataset.

    task: "classification" or "language_model".
    input_shape: shape of one sample's input, e.g. (1, 28, 28), or (seq_len,) for a language model.
    num_classes: number of classes; the vocabulary size for a language model.
    seq_len: tokens per sample for a language model, else None.
    """

    task: str
    input_shape: tuple[int, ...]
    num_classes: int
    seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DataInfo.task must be one of {TASKS}, got {self.task!r}")


class InMemoryDataset(Dataset):
    """A dataset held as two tensors, `x` and `y`, with the same first dimension.

    `__getitem__(i)` returns `(x[i], y[i], i)`. `__getitems__(indices)` returns an already collated
    batch `(x[idx], y[idx], idx)` with `idx` the int64 tensor of global dataset indices: the
    DataLoader fetcher calls it when present, so a batch costs one tensor index instead of
    `batch_size` Python calls plus a stack. Use it with `collate_fn=as_batch`.

    `pixel_norm`: for images, the `(mean, std)` that standardised `x` from pixels in [0, 1]
    (`x = (pixels - mean) / std`), so preprocessing can get the pixels back; None otherwise.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str = "",
                 pixel_norm: tuple[float, float] | None = None) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x = x
        self.y = y
        self.name = name
        self.pixel_norm = pixel_norm

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], int(i)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.x[idx], self.y[idx], idx

    def __repr__(self) -> str:
        shapes = f"x={tuple(self.x.shape)}, y={tuple(self.y.shape)}"
        return f"InMemoryDataset({self.name!r}, n={len(self)}, {shapes})"


def as_batch(batch: Any) -> Any:
    """The DataLoader collate function for `InMemoryDataset`: the batch is already collated.

    A module-level function (not a lambda) so that worker processes can pickle it.
    """
    return batch


def is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def sample_indices(batch: Any) -> Optional[torch.Tensor]:
    """The dataset indices dist_train's loaders append to a tuple or list batch as its last element
    (an int64 vector), or None where a batch carries none (dict, namedtuple and tensor batches)."""
    if isinstance(batch, (tuple, list)) and batch and not is_namedtuple(batch):
        last = batch[-1]
        if isinstance(last, torch.Tensor) and last.dtype == torch.int64 and last.dim() == 1:
            return last
    return None


Builder = Callable[[Any], tuple[Dataset, Dataset, DataInfo]]
_BUILDERS: dict[str, Builder] = {}
_TASKS: dict[str, str] = {}
_TRAIN_SIZES: dict[str, Callable[[Any], Optional[int]]] = {}
_PIXELS: dict[str, bool] = {}


def register_dataset(name: str, task: str = "classification",
                     train_size: Optional[Callable[[Any], Optional[int]]] = None,
                     pixels: Optional[bool] = None) -> Callable[[Builder], Builder]:
    """Decorator: register `fn(cfg) -> (train_ds, eval_ds, DataInfo)` under `name`.

    `task` is declared up front so config validation can match models to datasets without
    reading any data; so is `train_size(cfg)`, the number of training samples when it is known
    without reading the data (None: not known), so that a global batch larger than the training
    set is refused before any process starts. `pixels`: whether its images are standardised
    [0, 1] pixels it can give back (`pixel_norm`), which the pixel-space augmentations need
    (None: not known before it is built).
    """
    if task not in TASKS:
        raise ValueError(f"dataset {name!r}: task must be one of {TASKS}, got {task!r}")

    def decorator(fn: Builder) -> Builder:
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"dataset {name!r} is already registered")
        _BUILDERS[name] = fn
        _TASKS[name] = task
        if train_size is not None:
            _TRAIN_SIZES[name] = train_size
        if pixels is not None:
            _PIXELS[name] = pixels
        return fn

    return decorator


def dataset_train_size(cfg: Any) -> Optional[int]:
    """The training samples of the registered dataset `cfg.name`, if known without reading it."""
    size = _TRAIN_SIZES.get(cfg.name)
    return None if size is None else size(cfg)


def dataset_has_pixels(name: str) -> Optional[bool]:
    """Whether the registered dataset `name` gives back [0, 1] pixels (None: not declared)."""
    return _PIXELS.get(name)


def is_builtin_dataset(name: str) -> bool:
    """Whether ``name`` is one of dist_train's own datasets (they read the data.* keys, never
    data.args)."""
    fn = _BUILDERS.get(name)
    return fn is not None and fn.__module__.split(".")[0] == "dist_train"


def dataset_names() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(_BUILDERS)


def dataset_task(name: str) -> str:
    """The task ("classification" or "language_model") a registered dataset declares."""
    if name not in _TASKS:
        raise ValueError(f"data.name={name!r} is not a registered dataset; choose one of: {', '.join(dataset_names())}")
    return _TASKS[name]


def build_datasets(cfg: Any) -> tuple[Dataset, Dataset, DataInfo]:
    """Build `(train_ds, eval_ds, info)` for the dataset named by `cfg.name` (the `data` section),
    with the image preprocessing of `data.resize`, `data.augment` and `data.normalize` applied
    (see `transforms.py`; `info.input_shape` is the resized shape).

    Raises ValueError for an unknown name and FileNotFoundError when the data files are missing.
    """
    name = cfg.name
    if name not in _BUILDERS:
        raise ValueError(
            f"data.name={name!r} is not a registered dataset; choose one of: {', '.join(dataset_names())}"
        )
    train_ds, eval_ds, info = _BUILDERS[name](cfg)
    if not isinstance(info, DataInfo):
        raise TypeError(f"dataset builder {name!r} must return a DataInfo, got {type(info).__name__}")
    if info.task != _TASKS[name]:
        raise TypeError(f"dataset {name!r} was registered as {_TASKS[name]!r} but built a {info.task!r} dataset")
    return apply_preprocessing(train_ds, eval_ds, info, cfg)
