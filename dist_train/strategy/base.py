"""The one small interface every parallel strategy implements.

The training loop talks only to this interface, so it never asks which strategy it runs:

    strategy.setup(model, make_optimizer, make_scheduler)
    for each micro-batch:
        with strategy.accumulate(sync=is_last_micro_step), strategy.autocast():
            loss = loss_fn(strategy.model(x), y)
        strategy.backward(loss / accum)      # DeepSpeed's engine owns backward, so it goes through here
    result = strategy.step(max_norm)         # unscale, clip, optimizer + scheduler step, zero grad

Checkpointing reaches model and optimizer state through ``strategy.model``/``strategy.optimizer``
(or the strategy's own ``state_dict`` hooks where an engine owns them).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import nn

from dist_train.env.cluster import ClusterEnv

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepPlan:
    """The shape of one optimizer step, for engines that must know it up front (DeepSpeed)."""

    micro_batch_size: int
    grad_accum_steps: int
    grad_clip: float


@dataclass
class StepResult:
    """What one optimizer step reports: the pre-clip global gradient norm, and whether the
    step was skipped (fp16 overflow), with the loss scale in force."""

    grad_norm: float
    skipped: bool = False
    loss_scale: Optional[float] = None


class Precision:
    """Autocast and (for fp16) a gradient scaler: shared by the torch-native strategies."""

    def __init__(self, precision: str, device: torch.device):
        self.precision = precision
        self.device = device
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> ContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> StepResult:
        """Step (or skip on inf/nan under fp16); grad_norm is filled in by the caller."""
        if self.scaler is None:
            optimizer.step()
            return StepResult(grad_norm=0.0)
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return StepResult(grad_norm=0.0, skipped=self.scaler.get_scale() < scale_before,
                          loss_scale=self.scaler.get_scale())


class Strategy(ABC):
    """Wraps model and optimizer; owns backward, the optimizer step and gradient sync."""

    name: str = "base"

    def __init__(self, cfg, cluster: ClusterEnv, device: torch.device, precision: str,
                 plan: Optional[StepPlan] = None):
        self.cfg = cfg
        self.cluster = cluster
        self.device = device
        self.precision = Precision(precision, device)
        self.plan = plan
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LRScheduler

    def init_context(self) -> ContextManager:
        """Context the model is built in. FSDP with ``strategy.fsdp.meta_init`` builds on the meta
        device and materialises only the local shards in ``setup``; the others build normally."""
        return contextlib.nullcontext()

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory) -> None:
        """Move/shard/wrap ``model`` and build optimizer and scheduler over the result."""

    def autocast(self) -> ContextManager:
        return self.precision.autocast()

    def accumulate(self, sync: bool) -> ContextManager:
        """Context for one micro-step; ``sync=False`` skips the gradient reduce."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.scale(loss).backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` (0: only measure) and return the global pre-clip norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        limit = max_norm if max_norm > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, limit)

    def step(self, max_norm: float) -> StepResult:
        self.precision.unscale(self.optimizer)
        norm = self.clip_grad_norm(max_norm)
        result = self.precision.optimizer_step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        result.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        return result

    @property
    def unwrapped_model(self) -> nn.Module:
        """The user's module without wrappers (for evaluation helpers and export)."""
        return self.model

    # --- checkpoint hooks, called on every rank by dist_train.checkpoint ---------------------

    #: True when an engine writes its own checkpoint files (DeepSpeed): then the checkpoint
    #: manager calls save_native/load_native instead of saving state_dict() with DCP.
    native_checkpoint: bool = False

    def state_dict(self) -> dict:
        """Model and optimizer state in the form torch.distributed.checkpoint saves.

        ``get_state_dict`` strips wrapper prefixes (DDP's ``module.``) and keeps FSDP's sharded
        DTensors, so one checkpoint loads under single, DDP and FSDP at any world size.
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def save_native(self, path: str) -> None:
        raise NotImplementedError(f"strategy {self.name} has no native checkpoint format")

    def load_native(self, path: str) -> None:
        raise NotImplementedError(f"strategy {self.name} has no native checkpoint format")

    def teardown(self) -> None:
        """Release strategy resources; called on every rank before the process group ends."""
