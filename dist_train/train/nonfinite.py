"""``train.nonfinite``: what happens when a loss or gradient is not finite.

All ranks must veto the same optimizer step. A NaN in one rank's batch reaches every rank's
gradients through their all-reduce, so the strategies refuse a non-finite *global* gradient norm,
which every rank computes alike, with no extra collective: the torch-native ones (single, DDP,
FSDP) in ``Strategy.step``, DeepSpeed's engine inside its own step. Only where the engine would
not (bf16 with ``check_grad_overflow`` off) does every rank check its own loss, with the flags
all-reduced before the update (``veto``). A vetoed step's gradients are dropped; the schedule
still advances. Then, by policy:

- ``skip``: go on (the count is logged as ``nonfinite_steps``);
- ``abort``: checkpoint the state before the bad step (its weights are untouched) and stop, naming
  the step;
- ``rollback``: after ``train.nonfinite_patience`` bad steps in a row, reload the newest checkpoint
  and continue from there with the data after the bad batches.

fp16 overflow is not a non-finite step: the gradient scaler skips it and lowers its scale (logged
as ``skipped_steps`` and ``loss_scale``).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from dist_train.env.collectives import any_true

log = logging.getLogger("dist_train")


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite loss or gradient (train.nonfinite=abort)."""


class NonFiniteGuard:
    def __init__(self, policy: str, patience: int, device: torch.device):
        self.policy, self.patience, self.device = policy, patience, device
        self.in_a_row = 0
        self.abort: Optional[NonFiniteError] = None  # set by after_step under train.nonfinite=abort

    def veto(self, loss: torch.Tensor) -> bool:
        """Collective: True on every rank when any rank's loss is not finite."""
        return any_true(not bool(torch.isfinite(loss).all()), device=self.device)

    def after_step(self, state, output, checkpointer) -> bool:
        """After a step, on every rank; True when the loop must roll back to the last checkpoint."""
        step = state.step  # (state.nonfinite_steps: the run's count, checkpointed)
        if not getattr(output.result, "nonfinite", False):
            self.in_a_row = 0
            if state.nonfinite_steps:  # (torch.full: a fill kernel; torch.tensor on a GPU waits for the device)
                output.metrics["nonfinite_steps"] = torch.full((), float(state.nonfinite_steps), device=self.device)
            return False
        state.nonfinite_steps += 1
        self.in_a_row += 1
        output.metrics["nonfinite_steps"] = torch.full((), float(state.nonfinite_steps), device=self.device)
        log.warning("step %d: non-finite loss or gradient on some rank; the update was dropped (train.nonfinite=%s)",
                    step, self.policy)
        if self.policy == "abort":  # (the loop logs the step's record, checkpoints, then raises it)
            self.abort = NonFiniteError(f"step {step}: non-finite loss or gradient; stopped (train.nonfinite=abort) "
                                        f"after checkpointing the last good weights at step {step}")
        if self.policy == "rollback" and self.in_a_row >= self.patience:
            self.in_a_row = 0
            return True
        return False
