"""Checks that need the registries or the machine, run before any process group starts.

Each failure is a ConfigError naming the key, so every rank exits 2 with the same message
instead of failing deep inside a library (or hanging its peers). Strategy-specific checks belong
to each strategy (``Strategy.check_config``); this module only asks the registry for the class.
"""
from __future__ import annotations

import os

import torch

from dist_train.config.schema import ConfigError
from dist_train.env.cluster import ClusterEnv


def preflight(job, cluster: ClusterEnv) -> None:
    from dist_train.data import dataset_names
    from dist_train.data.registry import dataset_task
    from dist_train.models.registry import check_model_compatible, model_names
    from dist_train.strategy import StepPlan, resolve_name, strategy_class, strategy_names

    if job.data.name not in dataset_names():
        raise ConfigError("data.name", f"unknown dataset {job.data.name!r}; registered: {', '.join(dataset_names())}")
    if job.model.name not in model_names():
        raise ConfigError("model.name", f"unknown model {job.model.name!r}; registered: {', '.join(model_names())}")
    try:
        check_model_compatible(job.model.name, dataset_task(job.data.name))
    except ValueError as exc:
        raise ConfigError("model.name", str(exc)) from None

    name = resolve_name(job.strategy.name, cluster.world_size)
    if name not in strategy_names():
        raise ConfigError("strategy.name", f"must be auto or a registered strategy: {', '.join(strategy_names())}; "
                          f"got {name!r}")
    cuda = torch.cuda.is_available()
    if job.train.precision == "fp16" and not cuda:
        raise ConfigError("train.precision", "fp16 needs a CUDA GPU (no GPU here); use bf16 or fp32 on the CPU")
    if job.train.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision", "this GPU has no bf16 support; use fp16 or fp32")
    plan = StepPlan(job.data.batch_size, job.train.grad_accum_steps, job.train.grad_clip)
    strategy_class(name).check_config(job.strategy, plan, job.train.precision, cluster.world_size)
    if job.checkpoint.resume not in ("auto", "never") and not os.path.exists(job.checkpoint.resume):
        raise ConfigError("checkpoint.resume", f"no checkpoint at {job.checkpoint.resume!r} (auto, never or a path)")
