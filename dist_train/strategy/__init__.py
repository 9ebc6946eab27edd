"""Parallel strategies behind one small interface, chosen by name from a registry."""
from __future__ import annotations

import importlib
from typing import Dict, Tuple

import torch

from dist_train.env.cluster import ClusterEnv
from dist_train.strategy.base import Strategy, StepResult

# name -> (module, class); imported lazily so `single` never imports deepspeed.
_REGISTRY: Dict[str, Tuple[str, str]] = {
    "single": ("dist_train.strategy.single", "SingleStrategy"),
    "ddp": ("dist_train.strategy.ddp", "DDPStrategy"),
}


def register_strategy(name: str, module: str, cls: str) -> None:
    _REGISTRY[name] = (module, cls)


def strategy_names():
    return sorted(_REGISTRY)


def resolve_name(name: str, world_size: int) -> str:
    """``auto`` means ddp on more than one process, else single."""
    if name == "auto":
        return "ddp" if world_size > 1 else "single"
    return name


def build_strategy(cfg, cluster: ClusterEnv, device: torch.device, precision: str) -> Strategy:
    """Instantiate the strategy ``cfg.name`` (already resolved from ``auto``)."""
    name = resolve_name(cfg.name, cluster.world_size)
    if name not in _REGISTRY:
        raise ValueError(f"strategy.name: unknown strategy {name!r}; registered: {', '.join(strategy_names())}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(cfg, cluster, device, precision)


__all__ = ["Strategy", "StepResult", "build_strategy", "register_strategy", "resolve_name", "strategy_names"]
