"""One optimizer step: ``grad_accum_steps`` micro-batches, then clip and step."""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch

from dist_train.strategy.base import StepResult
from dist_train.train.tasks import loss_fn

Veto = Callable[[torch.Tensor], bool]


def train_step(strategy, data: Iterator[tuple], train_cfg, veto: Optional[Veto] = None) -> Tuple[torch.Tensor, StepResult]:
    """Run the micro-steps of one optimizer step; return this rank's mean loss and the step result.

    Gradients are reduced only on the last micro-step (``accumulate(sync=False)`` before it), and
    each micro-loss is divided by the number of micro-steps so the accumulated gradient is the
    gradient of the mean over the whole global batch. ``veto(mean loss)``, when given, is asked
    before the update: True drops it (the caller makes every rank answer alike).
    """
    accum = train_cfg.grad_accum_steps
    total = torch.zeros((), dtype=torch.float32, device=strategy.device)
    for micro in range(accum):
        x, y = next(data)[:2]
        x = x.to(strategy.device, non_blocking=True)
        y = y.to(strategy.device, non_blocking=True)
        with strategy.accumulate(sync=micro == accum - 1):
            with strategy.autocast():
                logits = strategy.model(x)
            loss = loss_fn(logits, y)
            strategy.backward(loss / accum)
        total += loss.detach()
    mean = total / accum
    apply = veto is None or not veto(mean)
    return mean, strategy.step(train_cfg.grad_clip, apply)
