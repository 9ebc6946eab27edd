"""Parallel strategies behind one small interface, chosen by name from a registry."""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple

import torch

from dist_train.env.cluster import ClusterEnv
from dist_train.strategy.base import StepPlan, StepResult, Strategy

# name -> (module, class); imported lazily so `single` never imports deepspeed.
_REGISTRY: Dict[str, Tuple[str, str]] = {
    "single": ("dist_train.strategy.single", "SingleStrategy"),
    "ddp": ("dist_train.strategy.ddp", "DDPStrategy"),
    "fsdp": ("dist_train.strategy.fsdp", "FSDPStrategy"),
    "deepspeed": ("dist_train.strategy.deepspeed", "DeepSpeedStrategy"),
}

# Strategies that run on a process group even with one process (then a 1-rank group).
NEEDS_GROUP = ("ddp", "fsdp", "deepspeed")


def register_strategy(name: str, module: str, cls: str) -> None:
    _REGISTRY[name] = (module, cls)


def strategy_names():
    return sorted(_REGISTRY)


def resolve_name(name: str, world_size: int) -> str:
    """``auto`` means ddp on more than one process, else single."""
    if name == "auto":
        return "ddp" if world_size > 1 else "single"
    return name


def build_strategy(cfg, cluster: ClusterEnv, device: torch.device, precision: str,
                   plan: Optional[StepPlan] = None) -> Strategy:
    """Instantiate the strategy ``cfg.name`` (``auto`` is resolved here). ``plan`` (micro-batch,
    accumulation, clipping) is required by DeepSpeed, whose engine is configured with it."""
    name = resolve_name(cfg.name, cluster.world_size)
    if name not in _REGISTRY:
        raise ValueError(f"strategy.name: unknown strategy {name!r}; registered: {', '.join(strategy_names())}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(cfg, cluster, device, precision, plan)


__all__ = ["NEEDS_GROUP", "StepPlan", "Strategy", "StepResult", "build_strategy", "register_strategy", "resolve_name", "strategy_names"]
