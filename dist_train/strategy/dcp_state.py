"""How the torch-native strategies (single, DDP, FSDP) put their state into a checkpoint.

``get_state_dict`` strips wrapper prefixes (DDP's ``module.``) and keeps FSDP's sharded DTensors,
so one checkpoint loads under single, DDP and FSDP at any world size: DCP reads exactly the
pieces each rank's tensors need.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


def full_state(model: nn.Module, optimizer) -> Dict[str, Any]:
    """Model and optimizer state in the form torch.distributed.checkpoint saves."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def load_full_state(files, model: nn.Module, optimizer) -> None:
    state = full_state(model, optimizer)
    files.read_state(state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_model_state(files, model: nn.Module) -> None:
    state = {"model": get_model_state_dict(model)}
    files.read_state(state)
    set_model_state_dict(model, state["model"])


def model_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}


def shape_mismatches(stored: Dict[str, Tuple[tuple, Any]], current: Dict[str, tuple], limit: int = 5) -> Optional[str]:
    """A readable description of how a checkpoint's ``{name: (shape, dtype)}`` and a model's
    ``{name: shape}`` differ, else None."""
    problems = []
    missing = sorted(set(current) - set(stored))
    extra = sorted(set(stored) - set(current))
    if missing:
        problems.append(f"this model has parameters the checkpoint lacks: {', '.join(missing[:limit])}")
    if extra:
        problems.append(f"the checkpoint has parameters this model lacks: {', '.join(extra[:limit])}")
    wrong = [f"{k} {list(stored[k][0])} in the checkpoint vs {list(current[k])} here"
             for k in sorted(set(stored) & set(current)) if tuple(stored[k][0]) != tuple(current[k])]
    if wrong:
        problems.append("shapes differ: " + "; ".join(wrong[:limit]))
    return "; ".join(problems) or None


def foreign_optimizer_reason(meta: Dict[str, Any], strategy: str) -> str:
    """Why the optimizer state of a checkpoint in another strategy's format cannot be loaded."""
    return (f"it was written by {meta.get('strategy')} ({meta.get('kind')} format) and this run uses {strategy}: "
            f"model weights, step, data position, LR schedule and RNG carry over, but the optimizer state does not "
            f"(DeepSpeed keeps it in its own partitioned format, the others in DCP's). Resume with "
            f"strategy.name={meta.get('strategy')}, or set checkpoint.load_optimizer=false to continue with a fresh "
            f"optimizer state")
