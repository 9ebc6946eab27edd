"""Evaluation on the held-out split, on every rank, with sums all-reduced.

Every rank runs the same number of forward passes even when its shard is shorter (it repeats a
batch with zero weight): under FSDP each forward is a collective, and a rank that stops early
would leave the others waiting forever.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist

from dist_train.env.process_group import all_reduce_sum
from dist_train.train.tasks import eval_metrics, eval_sums


def _max_over_ranks(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def evaluate(strategy, loader, task: str, max_batches: int = 0) -> dict:
    """Loss and accuracy (and bits per byte for language models) over the whole split."""
    model = strategy.model
    was_training = model.training
    model.eval()
    device = strategy.device
    local = len(loader) if max_batches <= 0 else min(len(loader), max_batches)
    rounds = _max_over_ranks(local, device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    it: Iterator = iter(loader)
    first: Optional[tuple] = None
    for i in range(rounds):
        batch = next(it, None) if i < local else None
        weight = 1.0
        if batch is None or batch[0].shape[0] == 0:
            batch, weight = first, 0.0  # padding round: forward for the collectives, count nothing
        if batch is None:
            raise RuntimeError("evaluation split is empty on this rank; lower data.eval_batch_size")
        first = first or batch
        x = batch[0].to(device, non_blocking=True)
        y = batch[1].to(device, non_blocking=True)
        with strategy.autocast():
            logits = model(x)
        sums += eval_sums(logits, y) * weight
    del it
    all_reduce_sum(sums)
    model.train(was_training)
    return eval_metrics(task, sums)
