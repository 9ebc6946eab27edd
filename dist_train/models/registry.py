"""Model registry: names -> builders, task compatibility, and the one way models are built.

A builder is ``fn(cfg, info) -> nn.Module`` where ``cfg`` is the ``model`` config section and
``info`` describes the dataset (duck-typed: ``.task``, ``.input_shape``, ``.num_classes``,
``.seq_len``). Every built model provides:

- ``forward(x) -> logits``: ``[B, C]`` for classification, ``[B, T, V]`` for language modelling;
- ``block_classes``: the module classes a sharding strategy (FSDP) wraps one by one;
- ``init_weights()``: (re)initialises every parameter and buffer from torch's default RNG in a
  fixed module order, so a model built on the ``meta`` device and materialised with
  ``to_empty()`` gets exactly the weights of a model built directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dist_train.models.init import attach_init

Builder = Callable[[Any, Any], nn.Module]


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    tasks: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, tasks: tuple[str, ...] = ("classification",)) -> Callable[[Builder], Builder]:
    """Register ``fn(cfg, info) -> nn.Module`` under ``name`` for the given data tasks."""

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = _Entry(fn, tuple(tasks))
        return fn

    return decorator


def model_names() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def is_builtin_model(name: str) -> bool:
    """Whether ``name`` is one of dist_train's own models (they read model.hidden, model.gpt ...,
    never model.args)."""
    entry = _REGISTRY.get(name)
    return entry is not None and entry.builder.__module__.split(".")[0] == "dist_train"


def check_model_compatible(name: str, task: str) -> None:
    """Raise ``ValueError`` naming ``model.name`` if ``name`` is unknown or cannot train on ``task``.

    Needs only names, so config validation can call it before anything is built.
    """
    tasks = _entry(name).tasks
    if task not in tasks:
        raise ValueError(
            f"model.name={name!r} cannot train on a {task!r} dataset; it supports "
            f"{', '.join(repr(t) for t in tasks)}; pick another model.name or data.name"
        )


def build_model(cfg: Any, info: Any) -> nn.Module:
    """Build the model ``cfg.name`` for the dataset described by ``info``, initialised.

    Modules are constructed on the ``meta`` device (no memory, no RNG draws), then materialised
    on the current default device and filled by ``init_weights()``. So the weights depend only on
    the RNG state at the call, and match the meta-device path exactly::

        with torch.device("meta"):
            model = build_model(cfg, info)   # stays on meta: nothing allocated
        model.to_empty(device=device)
        torch.manual_seed(seed)
        model.init_weights()                 # == build_model(cfg, info) after torch.manual_seed(seed)

    ``cfg.init`` (``model.init``) other than ``default`` re-initialises Linear and Conv layers
    after the model's own init, inside ``init_weights()`` (see ``models/init.py``).
    """
    check_model_compatible(cfg.name, info.task)
    # Read the device before entering our own meta context: a caller's `with torch.device("meta")`
    # is honoured (the model then stays on meta and init_weights is a no-op there).
    device = torch.get_default_device()
    with torch.device("meta"):
        model = _REGISTRY[cfg.name].builder(cfg, info)
    model.to_empty(device=device)
    # model.init (xavier_uniform, orthogonal, ...) becomes part of init_weights(), so FSDP's
    # re-run of init_weights() on the shards applies it too.
    attach_init(model, getattr(cfg, "init", "default"))
    model.init_weights()
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; a tied parameter is counted once."""
    # parameters() yields each Parameter object once, so tied weights are not double counted.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(
            f"model.name={name!r} is not a registered model; choose one of: {', '.join(model_names())}"
        )
    return _REGISTRY[name]
