"""Preemption: SIGTERM / SIGUSR1 ask the run to checkpoint at the next step boundary and stop.

SLURM sends SIGTERM (or, with ``--signal=USR1@SECONDS``, SIGUSR1) some time before it kills a
job; torchrun forwards SIGTERM to its workers and waits 30 s before SIGKILL. The handler only sets
a flag: the ranks agree on it at each step boundary with one all-reduce (a rank that got the
signal late still stops at the same step as the others), then every rank joins one last
checkpoint and the run exits with EXIT_PREEMPTED so that a requeued job resumes from it.
"""
from __future__ import annotations

import functools
import logging
import signal
import threading
from typing import Callable, Dict, Optional

import torch

from dist_train.env.collectives import any_true

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 3  # distinct from 1 (failed) and 2 (bad usage): "checkpointed, requeue me"
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class PreemptionWatcher:
    """Installs the signal handlers (main thread only) and answers "stop now?" collectively."""

    def __init__(self, device: torch.device):
        self.device = device
        self.signal_name = None
        self._previous: Dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("got %s: checkpointing at the next step boundary, then stopping", self.signal_name)

    def requested(self) -> bool:
        """Collective on the default group: True on every rank if any rank got a signal."""
        return any_true(self.signal_name is not None, device=self.device)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _ignore_signals_then(init_fn: Optional[Callable[[int], None]], worker_id: int) -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if init_fn is not None:
        init_fn(worker_id)


def shield_workers(loader) -> None:
    """Make ``loader``'s worker processes ignore the preemption signals.

    torchrun signals each worker's whole process group and SLURM every process of the step, so
    DataLoader workers get SIGTERM too; by default they die of it, and the training process then
    fails ("DataLoader worker ... is killed by signal") before it can checkpoint. Shielded, they
    keep serving batches until the training process shuts them down. Call before the first
    ``iter(loader)``.
    """
    if getattr(loader, "num_workers", 0) > 0:
        loader.worker_init_fn = functools.partial(_ignore_signals_then, loader.worker_init_fn)
