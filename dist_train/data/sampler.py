"""The sharded batch sampler: one global sample order, cut into global batches, sliced per rank.

The global order depends only on (seed, epoch), never on the world size:

    order = randperm(num_samples, order_seed(seed, epoch))   (arange without shuffle)
    global micro-batch k = order[k*W*B : (k+1)*W*B]      (W ranks, B micro-batch per rank)
    rank r's micro-batch k = global micro-batch k [r*B : (r+1)*B]

So W ranks with micro-batch B together see exactly what one process sees with micro-batch W*B,
consecutive micro-batches compose exactly under gradient accumulation, and a run can resume
mid-epoch from a global sample position on a different number of ranks.

With `sample_seeds=True` each index comes paired with its sample's seed, a hash of
(seed, epoch, index): what a randomly augmenting dataset seeds its draws with, so that a sample's
augmentation is the same whichever rank, worker or resumed run loads it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 values (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _head(seed: int, epoch: int) -> np.ndarray:
    """A hash of (seed, epoch), as a 1-element uint64 array."""
    with np.errstate(over="ignore"):
        head = _mix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
        return _mix64(head ^ (np.uint64(int(epoch) & 0xFFFFFFFFFFFFFFFF) + _GOLDEN))


def sample_seeds(seed: int, epoch: int, indices: Any) -> list[int]:
    """The seed of each sample ``index`` in ``epoch`` of a run seeded ``seed``: 63-bit ints, a hash
    of the three numbers (neighbouring seeds, epochs and indices give unrelated streams)."""
    idx = np.asarray(indices, dtype=np.uint64).reshape(-1)
    with np.errstate(over="ignore"):
        out = _mix64(_head(seed, epoch) ^ (idx + _GOLDEN))
    return (out >> np.uint64(1)).astype(np.int64).tolist()


# How an epoch's order is seeded: 1 (checkpoints before it was versioned) seeded it with
# seed + epoch, so run seed s at epoch e+1 replayed seed s+1 at epoch e (a seed sweep's runs saw
# each other's orders); 2 hashes the pair. A resumed run keeps its checkpoint's version.
ORDER_VERSION = 2


def order_seed(seed: int, epoch: int, version: int = ORDER_VERSION) -> int:
    """The generator seed of ``epoch``'s global order in a run seeded ``seed``."""
    if version == 1:
        return int(seed) + int(epoch)
    with np.errstate(over="ignore"):  # (a constant no sample index reaches: unrelated to sample_seeds)
        return int(_mix64(_head(seed, epoch) ^ np.uint64(0xD1B54A32D192ED03))[0] >> np.uint64(1))


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of dataset indices) of the global sample order.

    Train: `shuffle=True, drop_last=True` (the incomplete last global batch is dropped).
    Eval: `shuffle=False, drop_last=False`: the ranks together cover every sample exactly once;
    the last micro-batch may be short, or empty on some ranks. Empty batches are yielded rather
    than skipped so that every rank runs the same number of forward passes, which collective
    forwards (FSDP, DeepSpeed ZeRO-3) need to not hang; no sample is ever duplicated as padding.

    The order of a pass is fixed when the pass starts (at `iter()`), so `set_epoch` and
    `set_position` take effect at the next `iter(loader)`, also with persistent workers, since
    the batch sampler runs in the main process.

    `sample_seeds=True`: micro-batches are lists of `(index, sample_seeds(seed, epoch, index))`
    pairs instead of indices, for a dataset that augments each sample with its own seed.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        sample_seeds: bool = False,
    ) -> None:
        if num_samples < 0 or micro_batch_size < 1 or world_size < 1:
            raise ValueError(
                f"need num_samples >= 0, micro_batch_size >= 1 and world_size >= 1; got "
                f"num_samples={num_samples}, micro_batch_size={micro_batch_size}, world_size={world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.sample_seeds = bool(sample_seeds)
        self.epoch = 0
        self.position = 0  # global samples of the epoch consumed before the next pass starts
        self.order_version = ORDER_VERSION  # (a resumed run sets its checkpoint's)

    @property
    def global_batch_size(self) -> int:
        """Samples in one global micro-batch: all ranks together (world_size * micro_batch_size)."""
        return self.world_size * self.micro_batch_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank in a full epoch (every rank gets the same count)."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def __len__(self) -> int:
        """Micro-batches this rank yields in the next (possibly resumed) pass."""
        return self.batches_per_epoch - self.position // self.global_batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next pass follows. The position is left unchanged."""
        self.epoch = int(epoch)

    def set_position(self, global_sample_position: int) -> None:
        """Start the next pass after `global_sample_position` samples of the epoch (all ranks).

        It must be a multiple of the global batch size (world_size * micro_batch_size), which is
        what any resume at a micro-batch boundary gives.
        """
        pos, gbs = int(global_sample_position), self.global_batch_size
        end = self.batches_per_epoch * gbs
        if pos % gbs != 0:
            raise ValueError(
                f"sample position {pos} is not a multiple of the global batch size {gbs} "
                f"(world_size {self.world_size} x micro_batch_size {self.micro_batch_size}); "
                f"the nearest valid positions are {pos // gbs * gbs} and {(pos // gbs + 1) * gbs}"
            )
        if not 0 <= pos <= end:
            raise ValueError(f"sample position {pos} is outside the epoch's [0, {end}] samples")
        self.position = pos

    def global_order(self) -> torch.Tensor:
        """The epoch's global sample order (int64), identical on every rank and world size."""
        if not self.shuffle:
            return torch.arange(self.num_samples, dtype=torch.int64)
        g = torch.Generator().manual_seed(order_seed(self.seed, self.epoch, self.order_version))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        # Everything is decided here, eagerly, not lazily inside a generator: the DataLoader may
        # create the iterator well before it pulls the first batch.
        gbs, b, r = self.global_batch_size, self.micro_batch_size, self.rank
        start_batch = self.position // gbs
        order: list[Any] = self.global_order()[: self.batches_per_epoch * gbs].tolist()
        if self.sample_seeds:
            order = list(zip(order, sample_seeds(self.seed, self.epoch, order)))
        batches = [
            order[k * gbs + r * b : k * gbs + (r + 1) * b] for k in range(start_batch, self.batches_per_epoch)
        ]
        return self._run(batches)

    def _run(self, batches: list[list[int]]) -> Iterator[list[int]]:
        yield from batches
        # A full pass ends the epoch's resume point: the next pass starts from the beginning.
        self.position = 0
