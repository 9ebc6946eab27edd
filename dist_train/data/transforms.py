"""Image preprocessing and augmentation (``data.resize``, ``data.augment``, ``data.normalize``)
with ``torchvision.transforms.v2``, as a dataset wrapper that runs in the DataLoader workers.

Per batch, in this order:

    pixels in [0, 1]   (the dataset's standardised values, un-standardised with its mean and std)
    resize             (data.resize; train and eval)
    augment            (data.augment; train only; each sample on its own seeded RNG)
    standardise        (data.normalize: the dataset's mean and std)

Each sample's augmentation draws from torch's RNG seeded by ``(run.seed, epoch, index)``: the
sampler hands the wrapper ``(index, seed)`` pairs (``ShardedBatchSampler(sample_seeds=True)``),
so an augmented sample depends neither on the rank or worker that loads it nor on the world size,
and a resumed run sees exactly the samples an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from dist_train.config.schema import ConfigError

if TYPE_CHECKING:
    from torchvision.transforms import v2

Size = tuple[int, int]


def _v2() -> ModuleType:
    """``torchvision.transforms.v2``, imported on first use: importing torchvision costs about 2 s
    of CPU per process, which a job without image preprocessing (a language model) should not pay."""
    return importlib.import_module("torchvision.transforms.v2")


# Each name with fixed, commonly used parameters for small images of height x width `hw`.
_BUILDERS: dict[str, Callable[[Size], v2.Transform]] = {
    # Zero padding of an eighth of the side (4 pixels at 32x32, as for CIFAR), then a crop back.
    "random_crop": lambda hw: _v2().RandomCrop(hw, padding=max(1, min(hw) // 8)),
    "random_resized_crop": lambda hw: _v2().RandomResizedCrop(hw, scale=(0.6, 1.0), antialias=True),
    "hflip": lambda hw: _v2().RandomHorizontalFlip(p=0.5),
    "vflip": lambda hw: _v2().RandomVerticalFlip(p=0.5),
    "rotation": lambda hw: _v2().RandomRotation(degrees=15),
    # Saturation and hue leave single-channel images unchanged.
    "color_jitter": lambda hw: _v2().ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
    "gaussian_blur": lambda hw: _v2().GaussianBlur(kernel_size=3, sigma=(0.1, 1.0)),
    "random_erasing": lambda hw: _v2().RandomErasing(p=0.25, scale=(0.02, 0.2), value=0.0),
}
# These clamp to [0, 1]: they need real pixels, not standardised noise.
_NEEDS_PIXELS = {"color_jitter"}


def augmentation_names() -> list[str]:
    """The names ``data.augment`` accepts (config/schema.py's AUGMENTATIONS lists the same)."""
    return list(_BUILDERS)


def build_augment(names: Sequence[str], hw: Size) -> v2.Compose:
    """The named augmentations, in the given order, for images of size ``hw``."""
    for i, name in enumerate(names):
        if name not in _BUILDERS:
            raise ValueError(f"data.augment[{i}]: unknown augmentation {name!r}; choose from {', '.join(_BUILDERS)}")
    return _v2().Compose([_BUILDERS[name](hw) for name in names])


class ImageTransformDataset(Dataset):
    """Wraps a dataset of batched ``(x, y, idx)`` items (``InMemoryDataset``) with resize, seeded
    per-sample augmentation and standardisation.

    ``pixel_norm``: the ``(mean, std)`` with which the base's ``x`` was standardised from [0, 1]
    pixels, or None when it holds no such pixels (then ``x`` is transformed as it is).
    With ``augment``, items are keyed by ``(index, seed)`` pairs (``needs_sample_seeds``).
    """

    def __init__(self, base: Dataset, *, resize: Size | None, augment: v2.Compose | None,
                 normalize: bool, pixel_norm: tuple[float, float] | None) -> None:
        self.base = base
        self.resize = resize
        self.augment = augment
        self.normalize = normalize
        self.pixel_norm = pixel_norm
        self.name = getattr(base, "name", "")

    @property
    def needs_sample_seeds(self) -> bool:
        """True: the sampler must yield ``(index, seed)`` pairs (see ``ShardedBatchSampler``)."""
        return self.augment is not None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y, idx = self.__getitems__([key])
        return x[0], y[0], int(idx[0])

    def __getitems__(self, keys: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        if self.augment is not None:
            indices, seeds = [int(k[0]) for k in keys], [int(k[1]) for k in keys]
        else:
            indices, seeds = [int(k) for k in keys], []
        x, y, idx = self.base.__getitems__(indices)
        if self.pixel_norm is not None:
            mean, std = self.pixel_norm
            x = x * std + mean
        if self.resize is not None and tuple(x.shape[-2:]) != self.resize and len(x):
            x = _v2().functional.resize(x, list(self.resize), antialias=True)
        if self.augment is not None and len(x):
            x = self._augment(x, seeds)
        if self.normalize and self.pixel_norm is not None:
            mean, std = self.pixel_norm
            x = (x - mean) / std
        return x.contiguous(), y, idx

    def _augment(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        out = torch.empty_like(x)
        # The v2 transforms draw from torch's global CPU generator: seed it per sample, and give
        # the caller's state back (with num_workers=0 this runs in the training process).
        # default_generator.manual_seed, not torch.manual_seed: the latter also seeds every
        # accelerator's generators, which costs ~0.5 ms a call.
        saved = torch.get_rng_state()
        try:
            for i, seed in enumerate(seeds):
                torch.default_generator.manual_seed(seed)
                out[i] = self.augment(x[i])
        finally:
            torch.set_rng_state(saved)
        return out

    def __repr__(self) -> str:
        return (f"ImageTransformDataset({self.base!r}, resize={self.resize}, augment={self.augment is not None}, "
                f"normalize={self.normalize})")


def _settings(cfg: Any) -> tuple[list[str], int, bool]:
    return (list(getattr(cfg, "augment", None) or []), int(getattr(cfg, "resize", 0) or 0),
            bool(getattr(cfg, "normalize", True)))


def preprocessing_asked(cfg: Any) -> str | None:
    """The first of ``data.augment``, ``data.resize``, ``data.normalize`` set to do something other
    than the defaults (which leave a dataset as it is), or None."""
    names, side, normalize = _settings(cfg)
    if not names and not side and normalize:
        return None
    return "data.augment" if names else "data.resize" if side else "data.normalize"


def preprocessing_problem(cfg: Any, task: str, input_shape: tuple | None = None) -> tuple[str, str] | None:
    """``(key, reason)`` when the ``data`` section asks for image preprocessing that a dataset of
    ``task`` cannot have, else None. Needs no data: preflight can call it with the registered task."""
    key = preprocessing_asked(cfg)
    if key is None:
        return None
    if task != "classification" or (input_shape is not None and len(input_shape) != 3):
        shape = f" of shape {tuple(input_shape)}" if input_shape is not None else ""
        return key, f"applies to image datasets only; data.name={cfg.name!r} has {task} inputs{shape}"
    return None


def pixels_problem(cfg: Any, has_pixels: bool) -> tuple[str, str] | None:
    """``(key, reason)`` when ``data.augment`` or ``data.normalize=false`` needs [0, 1] pixels and
    the dataset holds standardised values it cannot give back, else None."""
    if has_pixels:
        return None
    names, _, normalize = _settings(cfg)
    needs_pixels = [n for n in names if n in _NEEDS_PIXELS]
    if not needs_pixels and normalize:
        return None
    key, what = (("data.augment", needs_pixels[0]) if needs_pixels else ("data.normalize", "false"))
    return key, f"{what} needs [0, 1] pixels, and data.name={cfg.name!r} holds standardised values"


def apply_preprocessing(train: Dataset, evals: Dataset, info: Any, cfg: Any) -> tuple[Dataset, Dataset, Any]:
    """``(train, eval, info)`` with ``data.resize``, ``data.augment`` (train only) and
    ``data.normalize`` applied; unchanged (the same objects) when none of them asks for anything.

    Raises ``ValueError`` naming the key for a dataset they cannot apply to.
    """
    names, side, normalize = _settings(cfg)
    if not names and not side and normalize:
        return train, evals, info
    shape = tuple(info.input_shape)
    problem = preprocessing_problem(cfg, info.task, shape)
    # ConfigError (a ValueError): every rank stops with exit 2 and this message, no traceback.
    if problem:
        raise ConfigError(*problem)
    pixel_norm = getattr(train, "pixel_norm", None)
    problem = pixels_problem(cfg, pixel_norm is not None)
    if problem:
        raise ConfigError(*problem)
    hw = (side, side) if side else (shape[1], shape[2])
    common = dict(resize=hw if side else None, normalize=normalize)
    augment = build_augment(names, hw) if names else None
    train = ImageTransformDataset(train, augment=augment, pixel_norm=pixel_norm, **common)
    evals = ImageTransformDataset(evals, augment=None, pixel_norm=getattr(evals, "pixel_norm", None), **common)
    return train, evals, dataclasses.replace(info, input_shape=(shape[0], *hw))
