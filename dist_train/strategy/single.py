"""One process, one device: the debug strategy and the reference the others must match."""
from __future__ import annotations

from torch import nn

from dist_train.config.schema import ConfigError
from dist_train.strategy import compiling
from dist_train.strategy.base import OptimizerFactory, SchedulerFactory, StepPlan, Strategy


class SingleStrategy(Strategy):
    name = "single"
    needs_process_group = False

    @classmethod
    def check_config(cls, cfg, plan: StepPlan, precision: str, world_size: int) -> None:
        if world_size > 1:
            raise ConfigError("strategy.name", f"single runs one process, but this job has world size {world_size}; "
                              "use ddp, fsdp or deepspeed (or auto)")

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory) -> None:
        self.model = model.to(self.device)
        if compiling.wanted(self):
            self.model.compile()  # in place: parameter names unchanged (see compiling.py)
        self.optimizer = make_optimizer(self.model)
        self.scheduler = make_scheduler(self.optimizer)
