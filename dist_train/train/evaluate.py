"""Evaluation on the held-out split, on every rank, with sums all-reduced.

Every rank runs the same number of forward passes even when its shard is shorter (it repeats a
batch with zero weight): under FSDP each forward is a collective, and a rank that stops early
would leave the others waiting forever.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from dist_train.env import collectives
from dist_train.env.seed import rng_state, set_rng_state
from dist_train.train.tasks import Task, batch_size, to_device, without_indices


class Evaluator:
    """Owns the evaluation cadence: ``eval.every_steps`` and ``eval.every_epochs`` during training,
    and once at the end.
    ``progress`` is called after each evaluation batch (the hang watchdog's sign of life)."""

    def __init__(self, strategy, loader, task: Task, cfg, report, progress: Optional[Callable[[], None]] = None):
        self.strategy, self.loader, self.task, self.cfg = strategy, loader, task, cfg
        self.report = report  # report(step, results, final)
        self.progress = progress
        self.last: Dict[str, Any] = {}
        self.last_step = -1

    def already_done(self, step: int, results: Dict[str, Any]) -> None:
        """An earlier attempt evaluated the weights of ``step`` (a rerun of a finished run resumes
        at its last step): ``results`` are that evaluation's, and ``final(step)`` repeats nothing."""
        if results:
            self.last, self.last_step = dict(results), step

    def scheduled(self, step: int, epoch: Optional[int] = None) -> bool:
        """Whether ``maybe_run(step, epoch)`` evaluates (alike on every rank). ``epoch``: the epochs
        completed when this step ended one (``eval.every_epochs``), else None."""
        if self.loader is None:
            return False
        by_epoch = epoch is not None and bool(self.cfg.every_epochs) and epoch % self.cfg.every_epochs == 0
        return by_epoch or (bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0)

    def maybe_run(self, step: int, epoch: Optional[int] = None) -> None:
        """After every optimizer step, on every rank."""
        if self.scheduled(step, epoch):
            self._run(step, final=False)

    def results_at(self, step: int) -> Optional[Dict[str, Any]]:
        """The results of the evaluation of ``step``, or None when it was not evaluated."""
        return dict(self.last) if self.last_step == step and self.loader is not None else None

    def final(self, step: int) -> None:
        """At the end of training (unless this step was just evaluated)."""
        if self.final_pending(step):
            self._run(step, final=True)

    def final_pending(self, step: int) -> bool:
        """Whether ``final(step)`` would evaluate (there is held-out data it has not seen at ``step``)."""
        return self.loader is not None and self.last_step != step

    def _run(self, step: int, final: bool) -> None:
        if self.loader is None:  # no held-out data
            return
        # The training streams continue after an evaluation as if there had been none: an eval set
        # that draws random numbers in this process (num_workers=0) would otherwise move them, and a
        # run stopped and resumed (the end-of-run evaluation, then the checkpoint) would no longer
        # match an uninterrupted one.
        streams = rng_state()
        try:
            self.last = evaluate(self.strategy, self.loader, self.task, self.cfg.max_batches, self.progress,
                                 indexed=True)
        except BaseException:
            with contextlib.suppress(Exception):  # (never in place of the evaluation's own error)
                set_rng_state(streams)
            raise
        set_rng_state(streams)
        self.last_step = step
        self.report(step, self.last, final)


def _one_sample(loader, indexed: bool):
    dataset = loader.dataset
    batch = dataset.__getitems__([0]) if hasattr(dataset, "__getitems__") else loader.collate_fn([dataset[0]])
    return without_indices(batch) if indexed else batch


@torch.no_grad()
def evaluate(strategy, loader, task: Task, max_batches: int = 0,
             progress: Optional[Callable[[], None]] = None, indexed: bool = False) -> dict:
    """The task's evaluation metrics (loss, accuracy, ...) over the whole split; ``progress()``
    after each batch. ``indexed``: ``loader`` is one of dist_train's, whose tuple and list batches
    end with the sample indices (taken off before the task sees a batch)."""
    model = strategy.model
    was_training = model.training
    strategy.sync_buffers()  # (every rank evaluates with rank 0's BatchNorm statistics, as the checkpoint holds)
    model.eval()
    device = strategy.device
    local = len(loader) if max_batches <= 0 else min(len(loader), max_batches)
    rounds = collectives.max_int(local, device)
    sums: Optional[torch.Tensor] = None
    it: Iterator = iter(loader)
    first = None
    for i in range(rounds):
        batch = next(it, None) if i < local else None
        if indexed and batch is not None:
            batch = without_indices(batch)
        weight = 1.0
        if batch is None or batch_size(batch) == 0:
            # Padding round: a forward for the collectives, counted with weight 0. A rank whose
            # shard is empty borrows the split's first sample.
            batch, weight = (first if first is not None else _one_sample(loader, indexed)), 0.0
        first = first if first is not None else batch
        batch = to_device(batch, device)
        with strategy.autocast():  # (inside the wrapper's forward: see Strategy.run_task)
            part = strategy.run_task(lambda module: task.eval_sums(module, batch)) * weight
        sums = part if sums is None else sums + part
        if progress is not None:
            progress()
    del it
    model.train(was_training)
    if sums is None:
        raise RuntimeError("the evaluation split is empty on every rank")
    collectives.all_reduce(sums)
    return task.eval_metrics(sums)
