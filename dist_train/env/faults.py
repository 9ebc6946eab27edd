"""Fault injection for tests of the recovery paths: ``debug.faults``, parsed once at start-up.

    debug.faults="after_shards@45,step_sleep=0.1"

    after_shards[@STEP]        every rank exits (os._exit(FAULT_EXIT)) after writing its checkpoint
                               files and before the commit (at every save, or only at STEP)
    after_commit[@STEP[:RANK]] the process exits right after a checkpoint's commit (every rank, or
                               RANK only; at every save, or only at STEP)
    slow_write=SECONDS         sleep before writing a checkpoint's shards (makes async saves observable)
    slow_staging=SECONDS       an async save's writer thread sleeps before it copies the parameters and
                               optimizer state (the next optimizer step must wait for that copy)
    step_sleep=SECONDS         sleep after each optimizer step (gives a test time to send a signal)
    nan@STEP[:RANK]            the inputs of the batch feeding optimizer step STEP become NaN (on
                               RANK only; default every rank); repeatable: nan@5:1,nan@6:1
    stall@STEP[:RANK]=SECONDS  RANK stalls that long while fetching the batch of step STEP (a hang)
    crash@STEP[:RANK]          the process exits hard (os._exit(FAULT_EXIT)) right after step STEP
    worker_fork_hang[@:RANK]   the first DataLoader worker this process forks for training stays inside
                               fork() for ever (as CPython 3.8-3.11's deadlock leaves one)
    startup_stall[@:RANK]=SECONDS  RANK (or every rank) sleeps that long before its resume: a hang in
                               the start-up, while its peers wait in the resume's collectives

Production runs leave ``debug.faults`` empty: then every call here is a dictionary lookup that
finds nothing. Components that can be faulted receive the parsed ``Faults`` object.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Iterator, List, NamedTuple, Optional

import torch

from dist_train.config.schema import FAULTS as KNOWN

log = logging.getLogger(__name__)

FAULT_EXIT = 86


class Fault(NamedTuple):
    step: Optional[int]
    rank: Optional[int]
    value: Optional[str]


class Faults:
    """The parsed ``debug.faults`` setting."""

    def __init__(self, spec: str = ""):
        self.by_name: Dict[str, List[Fault]] = {}
        for item in filter(None, (x.strip() for x in (spec or "").split(","))):
            key, _, value = item.partition("=")
            name, _, at = key.partition("@")
            step, _, rank = at.partition(":")
            if name not in KNOWN:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(KNOWN)}")
            self.by_name.setdefault(name, []).append(
                Fault(int(step) if step else None, int(rank) if rank else None, value or None))

    def _match(self, name: str, step: Optional[int] = None, rank: Optional[int] = None) -> Optional[Fault]:
        for fault in self.by_name.get(name, ()):
            if (fault.step is None or step is None or fault.step == step) and (fault.rank in (None, rank)
                                                                               or rank is None):
                return fault
        return None

    @property
    def active(self) -> bool:
        return bool(self.by_name)

    def crash_point(self, name: str, step: int, rank: Optional[int] = None) -> None:
        """Exit the process hard here if this point (and this step, and rank) is named."""
        if self._match(name, step, rank):
            log.error("debug.faults: exiting at %s of step %d", name, step)
            logging.shutdown()
            os._exit(FAULT_EXIT)

    def delay(self, name: str, rank: Optional[int] = None) -> None:
        fault = self._match(name, None, rank)
        if fault and fault.value:
            if rank is not None:
                log.warning("debug.faults: rank %d sleeps %s s at %s", rank, fault.value, name)
            time.sleep(float(fault.value))

    def arm_fork_hang(self, rank: int) -> None:
        """``worker_fork_hang``: the next child this process forks (on RANK, or every rank) blocks in
        an at-fork handler, that is inside ``os.fork()``, before it runs any of its own code."""
        if self._match("worker_fork_hang", None, rank):
            hang_next_forks(1)
            log.warning("debug.faults: rank %d's next forked child (a DataLoader worker) hangs inside fork()", rank)

    def wrap(self, batches: Iterator, state, rank: int) -> Iterator:
        """Pass micro-batches through, applying ``nan@`` and ``stall@`` to the steps they name, once
        each: the batch is bad, not the step number (after a rollback the same step gets new data)."""
        fired = set()
        for batch in batches:
            step = state.step + 1
            if step in fired:
                yield batch
                continue
            stall = self._match("stall", step, rank)
            if stall:
                log.warning("debug.faults: rank %d stalls %s s in the data of step %d", rank, stall.value, step)
                time.sleep(float(stall.value or 3600))
            if self._match("nan", step, rank):
                x = batch[0]
                batch = (torch.full_like(x, float("nan")) if x.is_floating_point() else x, *batch[1:])
                log.warning("debug.faults: NaN inputs for step %d on rank %d", step, rank)
            if stall or self._match("nan", step, rank):
                fired.add(step)
            yield batch


_FORK_HANG = {"registered": False, "armed": 0, "this_fork": False}


def hang_next_forks(count: int) -> None:
    """The next ``count`` children this process forks block in an at-fork handler, inside
    ``os.fork()``, as CPython 3.8-3.11's deadlock leaves one (0 disarms)."""
    if not _FORK_HANG["registered"]:
        os.register_at_fork(before=_before_fork, after_in_child=_in_forked_child,
                            after_in_parent=_after_fork_in_parent)
        _FORK_HANG["registered"] = True
    _FORK_HANG["armed"] = int(count)


def _before_fork() -> None:
    _FORK_HANG["this_fork"] = _FORK_HANG["armed"] > 0
    _FORK_HANG["armed"] = max(0, _FORK_HANG["armed"] - 1)


def _in_forked_child() -> None:
    while _FORK_HANG["this_fork"]:
        time.sleep(3600)


def _after_fork_in_parent() -> None:
    _FORK_HANG["this_fork"] = False


NO_FAULTS = Faults()
