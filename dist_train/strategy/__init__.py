"""Parallel strategies behind one small interface, chosen by name from a registry.

The registry is the one source of strategy names: the config accepts any registered name, and
adding a strategy means a class in this package (or a user's module) and one
``register_strategy`` call.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Type, Union

import torch

from dist_train.env.cluster import ClusterEnv
from dist_train.strategy.base import StepPlan, StepResult, Strategy

# name -> a Strategy subclass, or "module:Class" imported on first use (so `single` never
# imports deepspeed).
_REGISTRY: Dict[str, Union[str, Type[Strategy]]] = {
    "single": "dist_train.strategy.single:SingleStrategy",
    "ddp": "dist_train.strategy.ddp:DDPStrategy",
    "fsdp": "dist_train.strategy.fsdp:FSDPStrategy",
    "deepspeed": "dist_train.strategy.deepspeed:DeepSpeedStrategy",
}


def register_strategy(name: str, target: Union[str, Type[Strategy]], cls: Optional[str] = None) -> None:
    """Make ``strategy.name=<name>`` build ``target``: a Strategy subclass or ``"module:Class"``
    (``register_strategy(name, module, cls)`` is accepted too)."""
    if name == "auto":
        raise ValueError("'auto' is not a strategy name: it chooses ddp or single")
    _REGISTRY[name] = f"{target}:{cls}" if cls else target


def strategy_names() -> List[str]:
    return sorted(_REGISTRY)


def resolve_name(name: str, world_size: int) -> str:
    """``auto`` means ddp on more than one process, else single."""
    if name == "auto":
        return "ddp" if world_size > 1 else "single"
    return name


def strategy_class(name: str) -> Type[Strategy]:
    """The class registered as ``name`` (already resolved from ``auto``); KeyError if none is."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown strategy {name!r}; registered: {', '.join(strategy_names())}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def build_strategy(cfg, cluster: ClusterEnv, device: torch.device, precision: str,
                   plan: Optional[StepPlan] = None) -> Strategy:
    """Instantiate the strategy ``cfg.name`` (``auto`` is resolved here). ``plan`` (micro-batch,
    accumulation, clipping) is required by DeepSpeed, whose engine is configured with it."""
    name = resolve_name(cfg.name, cluster.world_size)
    try:
        cls = strategy_class(name)
    except KeyError as exc:
        raise ValueError(f"strategy.name: {exc.args[0]}") from None
    return cls(cfg, cluster, device, precision, plan)


__all__ = ["StepPlan", "Strategy", "StepResult", "build_strategy", "register_strategy", "resolve_name",
           "strategy_class", "strategy_names"]
