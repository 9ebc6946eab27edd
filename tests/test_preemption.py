"""The preemption flag's agreement: every rank stops at the same step, soon after one rank's
signal, while fast steps exchange the flag only every few steps (its all-reduce is not free)."""
from __future__ import annotations

import signal
import time

import torch

from conftest import spawn


def _agree(rank: int, world_size: int, signal_rank: int, signal_at: int, step_s: tuple) -> None:
    import torch.distributed as dist

    from dist_train.env.preemption import PreemptionWatcher

    watcher = PreemptionWatcher(torch.device("cpu"))
    watcher.AGREE_EVERY_S = 0.03
    stopped = None
    try:
        for step in range(1, 400):
            time.sleep(step_s[rank])  # the ranks' steps take different times, as real ones may
            if step == signal_at and rank == signal_rank:
                watcher._handle(signal.SIGTERM, None)
            if watcher.requested():
                stopped = step
                assert watcher.requested() and watcher.requested()  # and it stays so
                break
    finally:
        watcher.close()
    got = [None] * world_size
    dist.all_gather_object(got, (stopped, watcher.exchanges))
    stops = [g[0] for g in got]
    assert stops[0] is not None and len(set(stops)) == 1, got  # the same step on every rank
    stop = stops[0]
    assert signal_at < stop, got
    # At most two intervals after the signal: ~2 x 0.03 s of ~4 ms steps (the slower rank's), with
    # room for a loaded machine, and far fewer exchanges than steps.
    assert stop - signal_at <= 40, got
    if signal_at > 1:
        assert got[0][1] <= stop // 2, got


def test_ranks_stop_at_the_same_step_soon_after_one_rank_is_signalled():
    spawn(_agree, 2, 1, 60, (0.002, 0.004))


def test_a_signal_before_the_first_exchange_stops_every_rank():
    spawn(_agree, 2, 0, 1, (0.003, 0.001))


def test_one_process_needs_no_exchange():
    from dist_train.env.preemption import PreemptionWatcher

    watcher = PreemptionWatcher(torch.device("cpu"))  # no process group here
    try:
        assert not watcher.requested()
        watcher._handle(signal.SIGTERM, None)
        assert watcher.requested() and watcher.exchanges == 0
    finally:
        watcher.close()
