"""The job builder: config sections in, the parts of a training job out.

    parts = build_parts(job, cluster, device)
    parts.strategy   # model, optimizer and scheduler built, wrapped or sharded
    parts.loader, parts.sampler, parts.eval_loader, parts.info

One sequence for every caller (the CLI's job, tests, benchmarks): seed, datasets, strategy, the
model built inside the strategy's init context, optimizer and scheduler built by the strategy over
the wrapped parameters, then the sharded loaders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dist_train.data import build_datasets
from dist_train.data.loader import build_eval_loader, build_train_loader
from dist_train.env.cluster import ClusterEnv
from dist_train.env.preemption import shield_workers
from dist_train.env.seed import seed_everything
from dist_train.models import build_model
from dist_train.strategy import StepPlan, Strategy, build_strategy
from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory


@dataclass
class JobParts:
    strategy: Strategy
    info: Any          # DataInfo: task, input shape, classes, sequence length
    loader: Any
    sampler: Any
    eval_loader: Any

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all ranks together."""
        return self.sampler.global_batch_size * self.strategy.plan.grad_accum_steps

    def close(self) -> None:
        self.strategy.teardown()


def step_plan(job) -> StepPlan:
    return StepPlan(job.data.batch_size, job.train.grad_accum_steps, job.train.grad_clip)


def build_training(job, cluster: ClusterEnv, device: torch.device, info) -> Strategy:
    """The strategy with the model, optimizer and scheduler of ``job`` set up on this rank."""
    strategy = build_strategy(job.strategy, cluster, device, job.train.precision, step_plan(job))
    with strategy.init_context():  # FSDP meta_init: the meta device, shards materialised in setup
        model = build_model(job.model, info)
    strategy.setup(model, make_optimizer_factory(job.train), make_scheduler_factory(job.train))
    return strategy


def build_parts(job, cluster: ClusterEnv, device: torch.device) -> JobParts:
    """Every part of the training job ``job`` for this rank (inside its process group)."""
    seed_everything(job.run.seed)
    train_ds, eval_ds, info = build_datasets(job.data)
    strategy = build_training(job, cluster, device, info)
    loader, sampler = build_train_loader(train_ds, job.data, rank=cluster.rank, world_size=cluster.world_size,
                                         seed=job.run.seed, device=device)
    eval_loader = build_eval_loader(eval_ds, job.data, rank=cluster.rank, world_size=cluster.world_size, device=device)
    shield_workers(loader)  # SIGTERM/SIGUSR1 reach workers too: only the training process acts on them
    shield_workers(eval_loader)
    return JobParts(strategy, info, loader, sampler, eval_loader)
