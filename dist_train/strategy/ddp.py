"""DistributedDataParallel: replicated weights, gradients all-reduced in buckets during backward."""
from __future__ import annotations

import contextlib
from typing import ContextManager

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train.strategy import compiling
from dist_train.strategy.base import OptimizerFactory, SchedulerFactory, Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory) -> None:
        model = model.to(self.device)
        # DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts
        # from the same weights even if their seeds had diverged.
        self.model = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.cfg.find_unused_parameters,
            bucket_cap_mb=self.cfg.bucket_cap_mb,
        )
        if compiling.wanted(self):
            # After wrapping, in place: DDPOptimizer splits the graph at the gradient buckets so
            # their all-reduces still overlap the backward (see compiling.py).
            self.model.compile()
        self.optimizer = make_optimizer(model)  # (DDP's own parameters, under the module's names)
        self.scheduler = make_scheduler(self.optimizer)

    def accumulate(self, sync: bool) -> ContextManager:
        # no_sync() keeps gradients local on non-final micro-steps; the final micro-step's
        # backward all-reduces the accumulated sum once.
        return contextlib.nullcontext() if sync else self.model.no_sync()

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model.module
