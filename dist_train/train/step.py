"""One optimizer step: ``grad_accum_steps`` micro-batches, then clip and step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch

from dist_train.env import collectives
from dist_train.strategy.base import StepResult
from dist_train.train.phases import PhaseClock
from dist_train.train.tasks import Classification, Task, to_device

Veto = Callable[[torch.Tensor], bool]


@dataclass
class StepOutput:
    loss: torch.Tensor                     # this rank's loss (a tensor): its mean over ranks is the step's
    result: StepResult                     # what the strategy reports (grad norm tensor, skipped, ...)
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # a task's own, averaged like the loss
    lr: Optional[float] = None  # the learning rate this step's update used (the schedule has moved on since)


def train_step(strategy, data: Iterator, train_cfg, task: Optional[Task] = None,
               veto: Optional[Veto] = None, grad_norms: int = 0, clock: Optional[PhaseClock] = None,
               finite_grads: bool = False) -> StepOutput:
    """Run the micro-steps of one optimizer step on this rank.

    Gradients are reduced only on the last micro-step (``accumulate(sync=False)`` before it), and
    each micro-loss is divided by the number of micro-steps so the accumulated gradient is the
    gradient of the mean of the micro-batches' means over the whole global batch. With
    ``train.loss_average=tokens`` the step's micro-batches are fetched first, their targets counted
    and summed over ranks (one all-reduce, no host sync), and each micro-batch's summed loss is
    divided by that global count instead (times the world size, since the strategies average
    gradients over ranks): the gradient of one mean over every counted target of the global batch,
    whatever the padding per micro-batch or rank. ``veto(mean loss)``, when given, is asked
    before the update: True drops it (the caller makes every rank answer alike). ``grad_norms=K``
    asks the strategy for the K modules with the largest gradient norms (every rank alike);
    ``finite_grads`` makes it drop an update whose global gradient norm is not finite.
    """
    task = task or Classification()
    clock = clock or PhaseClock()
    accum = train_cfg.grad_accum_steps
    total: Optional[torch.Tensor] = None  # (no zeros to start from: each kernel launch counts on a GPU)
    metrics: Dict[str, torch.Tensor] = {}
    per_target = getattr(train_cfg, "loss_average", "micro_batch") == "tokens"
    fetched = _fetch_all(data, accum, strategy.device, clock) if per_target else None
    weight = _per_target_weight(task, fetched, strategy.device) if per_target else None
    divide = accum > 1 and weight is None  # (micro_batch: each micro-loss is 1/accum of the mean)
    for micro in range(accum):
        if fetched is None:
            with clock("data"):
                batch = to_device(next(data), strategy.device)
        else:
            batch = fetched[micro]
        with clock("forward_backward"):
            with strategy.accumulate(sync=micro == accum - 1):
                with strategy.autocast():
                    # (inside the wrapper's forward: see Strategy.run_task)
                    if weight is None:
                        loss, extra = strategy.run_task(lambda model: task.loss(model, batch))
                    else:
                        summed, extra = strategy.run_task(lambda model: task.loss_sum(model, batch))
                        loss = summed * weight
                strategy.backward(loss / accum if divide else loss)  # (a division is two kernels)
            micro_loss = loss.detach().float().to(strategy.device)  # (a task's loss may sit elsewhere)
            total = micro_loss if total is None else total + micro_loss
            for key, value in extra.items():
                share = value.float() if accum == 1 else value.float() / accum
                metrics[key] = share if key not in metrics else metrics[key] + share
    mean = total / accum if divide else total
    if strategy.device.type == "cuda":
        # The host only queues kernels: without this wait the device's forward and backward would be
        # timed where the host first waits for it, the optimizer's read of the gradient norm. That
        # read waits right after, so this costs the launch of the norm's kernels, not a host stall.
        # The training stream only: an async save's copy on its side stream is waited for (and
        # timed) by before_update below.
        with clock("forward_backward"):
            torch.cuda.current_stream(strategy.device).synchronize()
    with clock("checkpoint"):
        strategy.before_update()  # an async save's copy of what the step changes (else nothing)
    with clock("optimizer"):
        lr = strategy.lr
        apply = veto is None or not veto(mean)
        result = strategy.step(train_cfg.grad_clip, apply, grad_norms, finite_grads=finite_grads)
    return StepOutput(mean, result, metrics, lr)


def _fetch_all(data: Iterator, accum: int, device: torch.device, clock: PhaseClock) -> List:
    """The step's ``accum`` micro-batches, on ``device`` (their targets are counted before the first
    forward)."""
    with clock("data"):
        return [to_device(next(data), device) for _ in range(accum)]


def _per_target_weight(task: Task, batches: List, device: torch.device) -> torch.Tensor:
    """world size / the targets counted in the whole global batch (every micro-batch of every
    rank; at least 1): a rank's summed micro-batch loss times this, averaged over ranks by the
    strategy's gradient reduction, is the global batch's mean over its targets. A device tensor:
    the host does not wait for it."""
    count = torch.stack([task.target_count(b).to(device) for b in batches]).sum().float()
    world = 1
    if collectives.initialized() and collectives.world_size() > 1:
        world = collectives.world_size()
        collectives.all_reduce(count, "sum")
    return world / count.clamp(min=1.0)
