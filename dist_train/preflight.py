"""Checks that need the registries or the machine, run before any process group starts.

Each failure is a ConfigError naming the key, so every rank exits 2 with the same message
instead of failing deep inside a library (or hanging its peers).
"""
from __future__ import annotations

import importlib.util

import torch

from dist_train.config.schema import ConfigError
from dist_train.env.cluster import ClusterEnv


def preflight(job, cluster: ClusterEnv) -> None:
    from dist_train.data import dataset_names
    from dist_train.data.registry import dataset_task
    from dist_train.models.registry import check_model_compatible, model_names
    from dist_train.strategy import resolve_name, strategy_names

    if job.data.name not in dataset_names():
        raise ConfigError("data.name", f"unknown dataset {job.data.name!r}; registered: {', '.join(dataset_names())}")
    if job.model.name not in model_names():
        raise ConfigError("model.name", f"unknown model {job.model.name!r}; registered: {', '.join(model_names())}")
    try:
        check_model_compatible(job.model.name, dataset_task(job.data.name))
    except ValueError as exc:
        raise ConfigError("model.name", str(exc)) from None

    strategy = resolve_name(job.strategy.name, cluster.world_size)
    if strategy not in strategy_names():
        raise ConfigError("strategy.name", f"{strategy!r} is not available; available: {', '.join(strategy_names())}")
    if strategy == "single" and cluster.world_size > 1:
        raise ConfigError("strategy.name", f"single runs one process, but this job has world size {cluster.world_size}; "
                          "use ddp, fsdp or deepspeed (or auto)")
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("strategy.name", "deepspeed is not installed (pip install 'dist_train[deepspeed]')")
    cuda = torch.cuda.is_available()
    if job.train.precision == "fp16" and not cuda:
        raise ConfigError("train.precision", "fp16 needs a CUDA GPU (no GPU here); use bf16 or fp32 on the CPU")
    if job.train.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision", "this GPU has no bf16 support; use fp16 or fp32")
    if job.checkpoint.resume not in ("auto", "never"):
        import os

        if not os.path.exists(job.checkpoint.resume):
            raise ConfigError("checkpoint.resume", f"no checkpoint at {job.checkpoint.resume!r} (auto, never or a path)")
