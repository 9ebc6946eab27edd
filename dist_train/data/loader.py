"""DataLoaders over the sharded batch sampler, for training and evaluation."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import random
import time
from multiprocessing.sharedctypes import RawArray
from typing import Any, Callable, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import _utils as loader_utils

from dist_train.config.schema import ConfigError
from dist_train.data.registry import as_batch
from dist_train.data.sampler import ShardedBatchSampler

log = logging.getLogger(__name__)


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


def _mark_started(flags, init_fn: Optional[Callable[[int], None]], worker_id: int) -> None:
    flags[worker_id] = 1
    if init_fn is not None:
        init_fn(worker_id)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes are checked to have come out of ``fork()``.

    A child forked from a process with other threads can deadlock inside ``os.fork()`` before it
    runs any Python: CPython 3.8-3.11 (python/cpython#112275, fixed in 3.12) re-takes the runtime's
    thread-state lock in the child before re-initialising it, and a C++ thread (gloo's, autograd's)
    that was creating its Python thread state at the fork holds it for ever. Seen here once in CI:
    a rank waited for the first batch of a worker that never started, its peer in an all-reduce,
    until the test's timeout. So when the workers start (the first ``iter()``; persistent workers
    are forked only then), each must mark a shared flag from its init function within
    ``start_timeout_s``; if one does not, all are killed (SIGKILL: a child stuck in C ignores
    SIGTERM) and started again, from the same position (the batch sampler lives in this process,
    and a ``position`` it has is put back), up to ``attempts`` times. Only for the ``fork`` start
    method: a spawned worker imports torch first, which may take longer than any fixed limit.
    """

    start_timeout_s = 30.0
    attempts = 3

    def __init__(self, *args: Any, rank: int = 0, start_timeout_s: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank = rank
        if start_timeout_s is not None:
            self.start_timeout_s = float(start_timeout_s)

    def _forks(self) -> bool:
        if self.num_workers == 0:  # (asking for the start method would fix the default context)
            return False
        context = self.multiprocessing_context or multiprocessing.get_context()
        return context.get_start_method() == "fork"

    def _get_iterator(self):
        if not self._forks():
            return super()._get_iterator()
        # Starting an iterator queues prefetch_factor x num_workers batches; near the end of a
        # pass that runs the batch sampler to its end, and ours then moves its resume point to the
        # next pass's start: a retry must start from where the first attempt did.
        # Each start draws the workers' base seed from the loader's generator: put that back too, so
        # that the workers a retry starts get the seeds the first ones had.
        position = getattr(self.batch_sampler, "position", None)
        generator = self.generator.get_state() if self.generator is not None else None
        attempts = max(1, self.attempts)
        for attempt in range(1, attempts + 1):
            if attempt > 1 and position is not None:
                self.batch_sampler.position = position
            if attempt > 1 and generator is not None:
                self.generator.set_state(generator)
            flags = RawArray("b", self.num_workers)
            init_fn = self.worker_init_fn
            self.worker_init_fn = functools.partial(_mark_started, flags, init_fn)
            try:
                iterator = super()._get_iterator()  # forks the workers
            finally:
                self.worker_init_fn = init_fn
            try:
                stuck = self._stuck_workers(iterator, flags)
            except BaseException:  # (torch's SIGCHLD handler, an interrupt): no stuck child left behind
                _discard(iterator)
                raise
            if not stuck:
                return iterator
            pids = ", ".join(str(iterator._workers[i].pid) for i in stuck)
            problem = (f"rank {self.rank}: DataLoader worker(s) {stuck} (pid {pids}) did not reach their init "
                       f"function within {self.start_timeout_s:g} s of being forked: stuck inside fork() (a lock "
                       f"held by another thread at the fork; CPython 3.8-3.11 has one, python/cpython#112275)")
            _discard(iterator)
            if attempt == attempts:
                raise RuntimeError(f"{problem}; gave up after {attempt} attempts (data.num_workers=0 loads in the "
                                   f"training process and forks nothing)")
            log.warning("%s; killed them, starting the workers again (attempt %d of %d)", problem, attempt + 1,
                        attempts)
        raise AssertionError("unreachable")

    def _stuck_workers(self, iterator, flags) -> List[int]:
        """The workers that have not marked their flag by the deadline (a worker that died is left
        to the DataLoader, which reports how)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            waiting = [i for i, w in enumerate(iterator._workers) if not flags[i] and w.is_alive()]
            if not waiting or time.monotonic() > deadline:
                return waiting
            time.sleep(0.005)


def _discard(iterator) -> None:
    """Kill all of ``iterator``'s workers and shut it down. A stuck child ignores SIGTERM (it is in
    C, and it inherited the training process's handlers), and a healthy one shielded from
    preemption signals would finish its current fetch first: SIGKILL for all, their queues are
    this iterator's own. Their pids leave torch's SIGCHLD table first (a registered worker killed
    by a signal makes that handler raise in this process)."""
    if iterator._worker_pids_set:
        loader_utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    for worker in iterator._workers:
        if worker.is_alive():
            worker.kill()
        worker.join()
    iterator._shutdown_workers()


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
    return WorkerLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=as_batch,  # the dataset's __getitems__ already returns a collated batch
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",  # pinned memory helps only host-to-GPU copies
        worker_init_fn=functools.partial(seed_worker, seed, rank),
        # The loader's generator only draws the per-iteration worker base seed; seeding it makes
        # that deterministic too.
        generator=torch.Generator().manual_seed(_derived_seed(seed, rank)),
        rank=rank,
        start_timeout_s=getattr(cfg, "worker_start_timeout_s", None),
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
