"""The training loop: readable in one sitting. Each component owns its cadence.

    while step < max_steps and not stopping:
        output = train_step(...)               # micro-steps, accumulation, clipping, optimizer step
        evaluator.maybe_run(step)              # every eval.every_steps (and eval.every_epochs)
        reporter.maybe_log(...)                # every logging.every_steps and evaluation, before the save
        checkpointer.maybe_save(state)         # every checkpoint.every_steps (and every_epochs)
        stopping = preemption.requested()      # agreed by all ranks
    evaluator.final(step)                      # unless preempted; joins the last step's record
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

from dist_train.env.collectives import rank, set_collective_timeout
from dist_train.env.faults import NO_FAULTS, Faults
from dist_train.train.phases import PhaseClock
from dist_train.train.state import TrainState
from dist_train.train.step import train_step


def micro_batches(loader, sampler, state: TrainState) -> Iterator[tuple]:
    """Endless micro-batches starting at ``state``'s epoch and global sample position.

    The position advances as a batch is handed out (not when the loader prefetches it), so at
    every optimizer-step boundary ``state.position`` is exactly the data consumed.
    """
    sampler.order_version = state.data_order
    while True:
        sampler.set_epoch(state.epoch)
        sampler.set_position(state.position)
        for batch in loader:
            state.position += sampler.global_batch_size
            state.samples_seen += sampler.global_batch_size
            yield batch
        state.epoch += 1
        state.position = 0


def epochs_done(state: TrainState, epoch_end: int) -> int:
    """Epochs of the training data completed at this optimizer-step boundary. ``epoch_end``: the
    global samples of an epoch's micro-batches (the epoch counter moves on only when the next
    batch is drawn)."""
    return state.epoch + int(state.position >= epoch_end)


def train(strategy, data: Iterator, state: TrainState, cfg, *, task, reporter, evaluator, checkpointer,
          preemption, guard, clock: PhaseClock, ledger, faults: Faults = NO_FAULTS,
          timeout_s: Optional[float] = None, epoch_end: Optional[int] = None) -> bool:
    """Run optimizer steps until ``cfg.max_steps`` (the ``train`` section) or a preemption, on every
    rank. Returns True when stopped by preemption. ``guard`` (train.nonfinite) vetoes non-finite
    steps alike on every rank, and may ask for a rollback to the last checkpoint. ``clock`` marks
    the phases (the step-time breakdown, goodput and the hang watchdog read it). After the first
    step, collectives get ``timeout_s`` (``dist.timeout_s``) instead of the long start-up one.
    ``epoch_end`` (the global samples of an epoch's micro-batches): the epoch cadences
    (``eval.every_epochs``, ``checkpoint.every_epochs``) and, under ``train.scheduler_interval=epoch``,
    the schedule (``Strategy.schedule_epochs``, a plain loop's ``scheduler.step()`` after each epoch)."""
    stopping, first = False, state.step
    done = None if epoch_end is None else epochs_done(state, epoch_end)  # epochs completed so far
    # A NaN on one rank reaches every rank's gradients through their all-reduce, so where the
    # strategy sees the global norm before the update that is the agreed check; else the loss is.
    veto = None if strategy.global_grad_norm else guard.veto
    # Throughput counts the loop's whole time per step (its bookkeeping and logging included: what
    # a user's run pays) except evaluation, checkpoint saves and rollbacks.
    mark = time.perf_counter()
    while state.step < cfg.max_steps and not stopping:
        t0 = time.perf_counter()
        output = train_step(strategy, data, cfg, task, veto, reporter.grad_norms_wanted(state.step + 1), clock,
                            finite_grads=True)
        step_s = time.perf_counter() - t0
        state.step += 1
        state.samples_trained = state.samples_seen
        state.skipped_steps += int(output.result.skipped)  # (before this step's save: checkpointed with it)
        ended = None  # the epochs completed, when this step ended one
        if epoch_end is not None:
            before, done = done, epochs_done(state, epoch_end)
            ended = done if done > before else None
            if cfg.scheduler_interval == "epoch":  # right after the step that ends an epoch, before its checkpoint
                strategy.schedule_epochs(done)
        if guard.after_step(state, output, checkpointer):
            with clock("checkpoint"):
                checkpointer.rollback(state)  # weights, optimizer, schedule, step; the data goes on
            reporter.rewind(state.step)
            mark = time.perf_counter()
            continue
        if guard.abort is not None:  # train.nonfinite=abort: the step's record, the last good weights, then stop
            reporter.maybe_log(state, output, step_s, time.perf_counter() - mark)
            with clock("checkpoint"):
                reporter.metrics.flush()
                checkpointer.finalize(state)  # the weights are those before the bad step
            raise guard.abort
        busy_s = time.perf_counter() - mark
        with clock("evaluation"):
            evaluator.maybe_run(state.step, ended)
        best = checkpointer.consider_best(state.step, evaluator.results_at(state.step))  # checkpoint.best_metric
        # The step's record before its save: the record needs every rank (the loss average), and a
        # rank lost after the save's commit would leave a checkpoint whose step has no record, a
        # hole in the resumed timeline. The save's time is counted in the next record's window.
        t_log = time.perf_counter()
        reporter.maybe_log(state, output, step_s, busy_s)
        log_s = time.perf_counter() - t_log
        with clock("checkpoint"):
            if best or checkpointer.due(state.step, ended):
                reporter.metrics.flush()  # on disk (TensorBoard's queued events too) before the commit
            checkpointer.maybe_save(state, ended, best)
        mark = time.perf_counter() - log_s  # (the logging counts in the next step's busy time)
        faults.delay("step_sleep")
        faults.crash_point("crash", state.step, rank())
        stopping = preemption.requested()
        if stopping:
            reporter.log_stop(state, output, step_s)  # (its record before its checkpoint, as every step's)
        clock.iteration_done(state.step)
        ledger.maybe_update(state.step, clock)
        if state.step == first + 1 and timeout_s:
            set_collective_timeout(timeout_s)
    if not stopping:
        # Every rank asks at once: a preempted job leaves its final evaluation to its rerun.
        stopping = preemption.agree_now()
    if not stopping:
        with clock("checkpoint"):
            checkpointer.settle()  # an async save of the last step commits during the evaluation
        with clock("evaluation"):
            evaluator.final(state.step)  # unless done at this step; joins the last step's record
        checkpointer.consider_best(state.step, evaluator.results_at(state.step))  # (finalize saves and marks it)
    return stopping
