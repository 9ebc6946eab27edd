"""DistributedDataParallel: replicated weights, gradients all-reduced in buckets during backward."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_train.strategy import compiling
from dist_train.strategy.base import OptimizerFactory, SchedulerFactory, Strategy

T = TypeVar("T")
_INPUT = object()  # (DDP's _pre_forward moves its inputs to the GPU and takes the first: one it passes as is)


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
            # The module, in place: the task runs it inside DDP's forward (run_task), where
            # TorchDynamo's DDPOptimizer splits the graph at the gradient buckets so their
            # all-reduces still overlap the backward (see compiling.py).
            model.compile()
        self.optimizer = make_optimizer(model)  # (DDP's own parameters, under the module's names)
        self.scheduler = make_scheduler(self.optimizer)

    def accumulate(self, sync: bool) -> ContextManager:
        # no_sync() keeps gradients local on non-final micro-steps; the final micro-step's
        # backward all-reduces the accumulated sum once.
        return contextlib.nullcontext() if sync else self.model.no_sync()

    def run_task(self, fn: Callable[[nn.Module], T]) -> T:
        """``fn(module)`` as DDP's forward: DDP's own steps before and after the module's call
        (``DistributedDataParallel.forward``'s: the reducer prepared for this forward, buffers
        broadcast, the output searched for the parameters it used), the module's call replaced by
        the task's. Through the wrapper, ``model.head(...)`` failed (DDP has no attribute ``head``);
        through ``model.module``, the backward reduced no gradient and the ranks' weights drifted
        apart without an error."""
        ddp = self.model
        with torch.autograd.profiler.record_function("DistributedDataParallel.forward"):
            ddp._pre_forward(_INPUT)
            if ddp._delay_all_reduce_all_params or ddp._use_python_reducer:
                output = fn(ddp.module)
            else:
                with ddp._inside_ddp_forward():  # (DDPOptimizer: the compiled module's buckets)
                    output = fn(ddp.module)
            return ddp._post_forward(output)

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model.module
