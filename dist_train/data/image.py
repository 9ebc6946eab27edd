"""Image classification datasets: fashion_mnist, digits, synthetic_images.

All are in-memory float32 tensors, normalised and deterministic, so that a run is reproducible
and the data pipeline never is the bottleneck being measured. Resizing and seeded augmentation
are opt-in (`data.resize`, `data.augment`: see `transforms.py`); fashion_mnist and digits record
the mean and std they were standardised with (`pixel_norm`), so that those can work on pixels.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import torch

from dist_train.config.schema import ConfigError
from dist_train.data.registry import DataInfo, InMemoryDataset, register_dataset

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
# Mean and std of the Fashion-MNIST train pixels scaled to [0, 1] (computed once over all 60k
# images). Fixed constants rather than recomputed per run, so train and eval share one transform.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_IDX_UBYTE = 0x08  # the idx format's type code for unsigned bytes, the only one MNIST files use


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: the Debian package ships the files compressed
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip file ({e})") from e
    return raw


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Parse an idx file (the MNIST format) of unsigned bytes with `ndim` dimensions.

    Raises ValueError naming the file when the magic number, the shape or the size is wrong.
    """
    data = _read_maybe_gzip(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: malformed idx file: {len(data)} bytes, shorter than its header")
    zero, dtype, file_ndim = int.from_bytes(data[0:2], "big"), data[2], data[3]
    if zero != 0 or dtype != _IDX_UBYTE or file_ndim != ndim:
        raise ValueError(
            f"{path}: malformed idx file: magic number {data[:4].hex()} "
            f"(expected 0000{_IDX_UBYTE:02x}{ndim:02x}: unsigned bytes, {ndim} dimensions)"
        )
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    expected = header + int(torch.tensor(dims).prod())
    if len(data) != expected:
        raise ValueError(
            f"{path}: malformed idx file: shape {dims} needs {expected} bytes, the file has {len(data)}"
        )
    # bytearray: torch.frombuffer wants writable memory.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / stem}[.gz] not found. Install it with "
        f"`apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DEFAULT_ROOT}), "
        f"or set data.root to a folder holding the idx files."
    )


def _load_fashion_split(root: Path, prefix: str) -> InMemoryDataset:
    try:
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"), ndim=1)
    except ValueError as exc:  # a damaged file: the data.root setting's problem (exit 2, no traceback)
        raise ConfigError("data.root", str(exc)) from None
    if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(
            f"{root}: {prefix} images {tuple(images.shape)} do not match labels {tuple(labels.shape)}"
        )
    if int(labels.max()) > 9:
        raise ValueError(f"{root}: {prefix} labels exceed 9 (max {int(labels.max())})")
    x = images.to(torch.float32).div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(1)
    return InMemoryDataset(x, labels.to(torch.int64), name=f"fashion_mnist/{prefix}",
                           pixel_norm=(FASHION_MNIST_MEAN, FASHION_MNIST_STD))


@register_dataset("fashion_mnist", pixels=True)
def build_fashion_mnist(cfg: Any) -> tuple[InMemoryDataset, InMemoryDataset, DataInfo]:
    """Fashion-MNIST from the idx files in `cfg.root` (default: the Debian package's folder)."""
    root = Path(cfg.root or FASHION_MNIST_DEFAULT_ROOT)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} does not exist. Install it with "
            f"`apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DEFAULT_ROOT}), "
            f"or set data.root to a folder holding the idx files."
        )
    train = _load_fashion_split(root, "train")
    test = _load_fashion_split(root, "t10k")
    return train, test, DataInfo("classification", (1, 28, 28), 10)


# The digits split is fixed forever: a constant permutation seed, independent of run.seed, so
# every run evaluates on the same held-out images.
_DIGITS_SPLIT_SEED = 1234
_DIGITS_EVAL_FRACTION = 0.2
_DIGITS_SAMPLES = 1797  # load_digits' count (preflight sizes the training split from it)


def _digits_arrays() -> tuple[Any, Any]:
    """(pixels (1797, 64), labels (1797,)) of scikit-learn's digits, as ``load_digits`` returns them.

    Read straight from the csv.gz shipped inside scikit-learn: importing scikit-learn itself costs
    2-3 s per process on a small machine, paid by every rank of every run. Falls back to
    ``load_digits`` if a future scikit-learn moves the file.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as f:
                table = np.loadtxt(f, delimiter=",")
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def _digits_eval_count(n: int) -> int:
    return int(round(n * _DIGITS_EVAL_FRACTION))


def _digits_train_size(_cfg: Any) -> int:
    return _DIGITS_SAMPLES - _digits_eval_count(_DIGITS_SAMPLES)


@register_dataset("digits", train_size=_digits_train_size, pixels=True)
def build_digits(cfg: Any) -> tuple[InMemoryDataset, InMemoryDataset, DataInfo]:
    """scikit-learn's 1797 8x8 digits: 80% train / 20% eval after a fixed permutation."""
    pixels, targets = _digits_arrays()
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 8, 8).div_(16.0).unsqueeze(1)  # 0..16
    labels = torch.as_tensor(targets, dtype=torch.int64)
    if len(labels) != _DIGITS_SAMPLES:
        raise ValueError(f"scikit-learn's digits hold {len(labels)} images, not the {_DIGITS_SAMPLES} expected")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    n_eval = _digits_eval_count(len(labels))
    train_idx, eval_idx = perm[:-n_eval], perm[-n_eval:]
    # Normalise with the train split's statistics only, as one would with unseen test data.
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    norm = (float(mean), float(std))
    return (
        InMemoryDataset(images[train_idx].contiguous(), labels[train_idx], name="digits/train", pixel_norm=norm),
        InMemoryDataset(images[eval_idx].contiguous(), labels[eval_idx], name="digits/eval", pixel_norm=norm),
        DataInfo("classification", (1, 8, 8), 10),
    )


_SYNTHETIC_SEED = 20240601
_SYNTHETIC_SHAPE = (3, 32, 32)
_SYNTHETIC_CLASSES = 10
_SYNTHETIC_SIGNAL = 0.5  # template amplitude relative to unit noise: learnable but not trivial


def _synthetic_split(templates: torch.Tensor, n: int, seed: int) -> InMemoryDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, _SYNTHETIC_CLASSES, (n,), generator=g)
    x = torch.randn((n, *_SYNTHETIC_SHAPE), generator=g)
    x.add_(templates[labels]).div_((1.0 + _SYNTHETIC_SIGNAL**2) ** 0.5)  # keep ~unit variance
    return InMemoryDataset(x, labels, name=f"synthetic_images/{seed}")


@register_dataset("synthetic_images", train_size=lambda cfg: int(cfg.synthetic_samples), pixels=False)
def build_synthetic_images(cfg: Any) -> tuple[InMemoryDataset, InMemoryDataset, DataInfo]:
    """Random (3, 32, 32) images whose label sets a class-dependent mean image; for benchmarks.

    `cfg.synthetic_samples` train samples and an eval split one eighth of that size (at least 64).
    """
    n_train = int(cfg.synthetic_samples)
    if n_train < 1:
        raise ValueError(f"data.synthetic_samples must be positive, got {n_train}")
    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    # Low-resolution templates upsampled to 32x32: spatially smooth patterns a CNN picks up fast.
    coarse = torch.randn((_SYNTHETIC_CLASSES, _SYNTHETIC_SHAPE[0], 4, 4), generator=g)
    templates = _SYNTHETIC_SIGNAL * torch.nn.functional.interpolate(
        coarse, size=_SYNTHETIC_SHAPE[1:], mode="nearest"
    )
    train = _synthetic_split(templates, n_train, _SYNTHETIC_SEED + 1)
    evals = _synthetic_split(templates, max(64, n_train // 8), _SYNTHETIC_SEED + 2)
    return train, evals, DataInfo("classification", _SYNTHETIC_SHAPE, _SYNTHETIC_CLASSES)
