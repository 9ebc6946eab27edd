"""The training loop: readable in one sitting. Each component owns its cadence.

    while step < max_steps and not stopping:
        output = train_step(...)               # micro-steps, accumulation, clipping, optimizer step
        reporter.maybe_log(...)                # every logging.every_steps
        evaluator.maybe_run(step)              # every eval.every_steps
        checkpointer.maybe_save(state)         # every checkpoint.every_steps
        stopping = preemption.requested()      # agreed by all ranks
    evaluator.final(step)                      # unless preempted: its time is short
"""
from __future__ import annotations

import time
from typing import Iterator

from dist_train.env.faults import NO_FAULTS, Faults
from dist_train.train.state import TrainState
from dist_train.train.step import train_step


def micro_batches(loader, sampler, state: TrainState) -> Iterator[tuple]:
    """Endless micro-batches starting at ``state``'s epoch and global sample position.

    The position advances as a batch is handed out (not when the loader prefetches it), so at
    every optimizer-step boundary ``state.position`` is exactly the data consumed.
    """
    while True:
        sampler.set_epoch(state.epoch)
        sampler.set_position(state.position)
        for batch in loader:
            state.position += sampler.global_batch_size
            state.samples_seen += sampler.global_batch_size
            yield batch
        state.epoch += 1
        state.position = 0


def train(strategy, data: Iterator, state: TrainState, cfg, *, task, reporter, evaluator, checkpointer,
          preemption, faults: Faults = NO_FAULTS, veto=None) -> bool:
    """Run optimizer steps until ``cfg.max_steps`` (the ``train`` section) or a preemption, on every
    rank. Returns True when stopped by preemption. ``veto(loss) -> bool`` may skip an optimizer
    step; it must answer alike on every rank."""
    stopping = False
    while state.step < cfg.max_steps and not stopping:
        t0 = time.perf_counter()
        output = train_step(strategy, data, cfg, task, veto, reporter.grad_norms_wanted(state.step + 1))
        state.step += 1
        reporter.maybe_log(state, output, time.perf_counter() - t0)
        evaluator.maybe_run(state.step)
        checkpointer.maybe_save(state)
        faults.delay("step_sleep")
        stopping = preemption.requested()
    if not stopping:
        evaluator.final(state.step)
    return stopping
