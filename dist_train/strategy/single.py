"""One process, one device: the debug strategy and the reference the others must match."""
from __future__ import annotations

from torch import nn

from dist_train.strategy.base import OptimizerFactory, SchedulerFactory, Strategy


class SingleStrategy(Strategy):
    name = "single"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory) -> None:
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model.parameters())
        self.scheduler = make_scheduler(self.optimizer)
