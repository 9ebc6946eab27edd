"""DataLoaders over the sharded batch sampler, for training and evaluation."""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dist_train.config.schema import ConfigError
from dist_train.data.registry import as_batch
from dist_train.data.sampler import ShardedBatchSampler


def _derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed + rank would collide: (1, 0) vs (0, 1))."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def seed_worker(seed: int, rank: int, worker_id: int) -> None:
    """worker_init_fn: seed torch, numpy and random in a worker from (seed, rank, worker id).

    Our datasets draw no random numbers from these streams (augmentation seeds each sample from
    (seed, epoch, index) instead: see `transforms.py`), and a user's dataset is reseeded per batch
    (`train.sources.MapDataset`); any other then gets the same streams in every run, and different
    streams in every worker of every rank.
    """
    seed_generators(_derived_seed(seed, rank, worker_id))


def seed_generators(seed: int) -> None:
    """Seed torch's CPU generator, ``random`` and numpy's global generator (3 + 10 + 3 us here;
    ``torch.manual_seed`` would also seed every accelerator's, ~0.5 ms)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _make_loader(
    dataset: Dataset, sampler: ShardedBatchSampler, cfg: Any, seed: int, rank: int, device: torch.device
) -> DataLoader:
    workers = int(cfg.num_workers)
    if workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {workers}")
    extra: dict[str, Any] = {}
    if workers > 0:
        # Persistent workers keep their forked copy of the dataset between epochs; that is safe
        # because the batch sampler (epoch, position) lives in the main process.
        extra = {"persistent_workers": True, "prefetch_factor": int(cfg.prefetch_factor)}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=as_batch,  # the dataset's __getitems__ already returns a collated batch
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",  # pinned memory helps only host-to-GPU copies
        worker_init_fn=functools.partial(seed_worker, seed, rank),
        # The loader's generator only draws the per-iteration worker base seed; seeding it makes
        # that deterministic too.
        generator=torch.Generator().manual_seed(_derived_seed(seed, rank)),
        **extra,
    )


def build_train_loader(
    dataset: Dataset, cfg: Any, *, rank: int, world_size: int, seed: int, device: torch.device
) -> tuple[DataLoader, ShardedBatchSampler]:
    """A training DataLoader with micro-batches of `cfg.batch_size` and its sampler.

    Shuffled by (seed, epoch), incomplete last global batch dropped. Call `sampler.set_epoch` /
    `sampler.set_position` before `iter(loader)` to choose the epoch and the resume point.
    A dataset that augments (`needs_sample_seeds`) gets `(index, seed)` pairs from the sampler.
    """
    sampler = ShardedBatchSampler(
        len(dataset), int(cfg.batch_size), rank, world_size, seed, shuffle=True, drop_last=True,
        sample_seeds=bool(getattr(dataset, "needs_sample_seeds", False)),
    )
    problem = batch_too_large(int(cfg.batch_size), world_size, len(dataset))
    if problem:  # every epoch would be empty: the loop would spin forever
        raise ConfigError("data.batch_size", problem)
    return _make_loader(dataset, sampler, cfg, seed, rank, device), sampler


def batch_too_large(batch_size: int, world_size: int, train_samples: int) -> str:
    """Why a global batch of ``world_size`` x ``batch_size`` cannot be drawn from the training set
    (every last incomplete global batch is dropped), or "" when it can."""
    if batch_size * world_size <= train_samples:
        return ""
    return (f"a global batch of {batch_size * world_size} samples (world size {world_size} x data.batch_size "
            f"{batch_size}) is more than the {train_samples} training samples: an epoch would hold no batch")


def build_eval_loader(
    dataset: Dataset, cfg: Any, *, rank: int, world_size: int, device: torch.device
) -> DataLoader:
    """An evaluation DataLoader with micro-batches of `cfg.eval_batch_size`, in dataset order.

    The ranks together see every sample exactly once. Every rank yields the same number of
    batches; the last ones may be short or empty (size 0), so sum losses and counts, then reduce.
    """
    sampler = ShardedBatchSampler(
        len(dataset), int(cfg.eval_batch_size), rank, world_size, seed=0, shuffle=False, drop_last=False
    )
    return _make_loader(dataset, sampler, cfg, 0, rank, device)
