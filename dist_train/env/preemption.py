"""Preemption: SIGTERM / SIGUSR1 ask the run to checkpoint at the next step boundary and stop.

SLURM sends SIGTERM (or, with ``--signal=USR1@SECONDS``, SIGUSR1) some time before it kills a
job; torchrun forwards SIGTERM to its workers and waits 30 s before SIGKILL. The handler only sets
a flag: the ranks agree on it at step boundaries with an all-reduce (a rank that got the signal
late still stops at the same step as the others), then every rank joins one last checkpoint and
the run exits with EXIT_PREEMPTED so that a requeued job resumes from it.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from typing import Callable, Dict, Optional

import datetime

import torch
import torch.distributed as dist

from dist_train.env.collectives import initialized, new_gloo_group

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 3  # distinct from 1 (failed) and 2 (bad usage): "checkpointed, requeue me"
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class EarlySignals:
    """Catches the preemption signals from the start of a run until its watcher takes over.

    Building a job (datasets, the model, its wrapping; made once the process group is up) can take
    minutes, and a scheduler may preempt it then: with the default handlers the process died of the
    signal, without its summary and with an exit code that says "killed" rather than "requeue me".
    Caught here, the signal only sets a flag: the ``PreemptionWatcher`` built after the job adopts
    it and the run stops at its first step boundary, with a checkpoint, like any preemption.
    ``release`` puts the handlers from before back (a run that failed before its watcher existed).
    """

    def __init__(self):
        self.signal_name: Optional[str] = None
        self.previous: Dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("got %s while the job is being built: stopping at its first step boundary, with a "
                        "checkpoint", self.signal_name)

    def release(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class PreemptionWatcher:
    """Installs the signal handlers (main thread only) and answers "stop now?" collectively.

    The ranks agree on the flag without stalling a step: an asynchronous all-reduce of this rank's
    flag on a gloo group of its own (host memory: no device sync) is started at one boundary and
    read ``interval`` boundaries later, when it has long finished, and the next one started. Each
    exchange also carries every rank's proposal for the next interval (as many steps as take
    about ``AGREE_EVERY_S`` on that rank, 1 to ``MAX_INTERVAL``; the largest wins), so every rank
    counts the same boundaries and stops at the same step: at most two intervals (about
    2 x ``AGREE_EVERY_S``, or two steps when steps are slower than that) after the first rank got
    its signal. A job of one process needs no exchange at all.
    """

    AGREE_EVERY_S = 0.25
    MAX_INTERVAL = 100

    def __init__(self, device: torch.device, early: Optional[EarlySignals] = None):
        """Collective when ``early`` is given (agreeing on the signals it caught) and always in
        building its gloo group."""
        self.device = device
        self.signal_name = None
        self.late_signal = None        # a signal held off after close(), while the run shut down
        self._previous: Dict[int, object] = {}
        self._group = new_gloo_group()  # collective: every rank builds its watcher at the same point
        self._alone = not initialized() or dist.get_world_size() == 1
        self._flag: Optional[torch.Tensor] = None
        self._work = None
        self._agreed = False           # the ranks agreed to stop
        self._countdown = 1            # boundaries until the pending exchange is read (alike on every rank)
        self._span = 1                 # boundaries between the last exchange and the next one
        self._started = time.perf_counter()
        self.exchanges = 0             # all-reduces started
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            if early is not None and early.previous:  # the handlers from before the run, not early's
                self._previous, early.previous = dict(early.previous), {}
                if early.signal_name is not None:  # (caught while the job was built, up to the swap just above)
                    self.signal_name = early.signal_name
        if early is not None and not self._alone:
            # Collective (every rank builds its watcher from the job with its EarlySignals): a signal
            # while the job was built, on any rank, stops every rank at the first step boundary.
            flag = torch.tensor([1 if self.signal_name else 0], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            self._agreed = bool(flag.item())

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("got %s: checkpointing at the next step boundary, then stopping", self.signal_name)

    def requested(self) -> bool:
        """At every step boundary, on every rank: True on every rank (at the same step) once any
        rank got a signal."""
        if self._alone or self._agreed:
            return self._agreed or self.signal_name is not None
        self._countdown -= 1
        if self._countdown > 0:
            return False
        now, interval = time.perf_counter(), 1
        if self._work is not None:
            self._work.wait()
            self._work = None
            flag, interval = self._flag.tolist()
            if flag > 0:
                self._agreed = True  # (and stays so: a later call answers alike on every rank)
                return True
        # This rank's proposal for the interval after the next, from its steps since the last exchange.
        per_step = (now - self._started) / self._span
        proposal = min(self.MAX_INTERVAL, max(1, int(self.AGREE_EVERY_S / per_step))) if per_step > 0 else 1
        self._flag = torch.tensor([1 if self.signal_name else 0, proposal], dtype=torch.int64)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._countdown = self._span = int(interval)
        self._started = now
        self.exchanges += 1
        return False

    def agree_now(self) -> bool:
        """Collective and blocking, on every rank at the same point: whether any rank has got a
        signal by now (the last step asks before its final evaluation, which a preempted job leaves
        to its rerun). An exchange in flight is read first; the next boundary starts a new one."""
        if self._alone or self._agreed:
            return self._agreed or self.signal_name is not None
        if self._work is not None:  # the exchange in flight first (every rank has one alike)
            self._work.wait()
            self._work = None
            self._countdown = 1  # (the next boundary starts a new exchange)
            if int(self._flag[0]) > 0:
                self._agreed = True
                return True
        flag = torch.tensor([1 if self.signal_name else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self._agreed = bool(flag.item())
        return self._agreed

    def close(self) -> None:
        """The training is over: finish the pending exchange, and from now on hold the signals off.

        A signal that arrives while the run shuts down (torchrun SIGTERMs every worker when one
        fails or exits first) would otherwise end the process before it has written its summary.
        ``release`` gives the handlers that were there before back.
        """
        if self._work is not None:  # every rank started the same all-reduces; a failed peer may not
            try:
                self._work.wait(datetime.timedelta(seconds=10))
            except Exception:  # noqa: BLE001  (shutting down after a failure)
                pass
            self._work = None
        if self._previous:
            for sig in self._previous:
                signal.signal(sig, self._hold)

    def _hold(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.late_signal is None:
            self.late_signal = name
            log.warning("got %s while shutting down: finishing the shutdown (summary.json, exit code) first", name)

    def release(self) -> None:
        """The handlers from before the watcher back (main thread; after ``close``)."""
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


def keep_launcher_from_restarting(cluster, signalled: bool) -> None:
    """After an agreed preemption, its checkpoint committed, on every rank: keep torchrun from
    starting the job again.

    torchrun with ``--max-restarts`` counts a worker's exit 3 as a failure and restarts the workers
    (they resume and train on, the stop request ignored, the restart budget and the grace period
    spent). So every worker ignores further preemption signals from here (it is on its way out;
    without restarts too), and local rank 0 sends its torchrun SIGTERM: torchrun then shuts its workers down, which
    finish their exit, instead of restarting them. Not when local rank 0 got a preemption signal
    itself: then torchrun was signalled too (it forwards its signals to every worker; a scheduler
    signals every process) and is shutting down already, and a second signal would cut its wait
    for the workers short.
    """
    if threading.current_thread() is threading.main_thread():
        # (Under any launcher: torchrun SIGTERMs the other workers when the first one exits, and a
        # rank still writing its summary died of it.)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if cluster.source != "torchrun" or not restarts.isdigit() or int(restarts) == 0:
        return
    if cluster.local_rank == 0 and not signalled:
        agent = os.getppid()
        log.warning("preempted under torchrun --max-restarts=%s: stopping torchrun (pid %d) so that it does not "
                    "start the job again; requeue the job to resume from its checkpoint", restarts, agent)
        try:
            os.kill(agent, signal.SIGTERM)
        except OSError as exc:  # (torchrun gone already: nothing left to restart the job)
            log.warning("could not signal torchrun (pid %d): %s", agent, exc)
