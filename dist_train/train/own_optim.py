"""A user's own optimizer and learning-rate scheduler: ``dist_train.fit(optimizer=..., scheduler=...)``.

A plain loop builds ``torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)`` and
``StepLR(optimizer, step_size=30)`` over the model it made. Under FSDP (and DeepSpeed) the
parameters the optimizer must hold exist only once the strategy has sharded the module, so
dist_train builds the optimizer there, from what the user gave (``OwnOptimizer``):

- an optimizer instance built over the model given to ``fit``: rebuilt over the strategy's
  parameters of the same names, with its class, its param groups' settings (a learning rate per
  group, weight decay, momentum, ...) and its defaults. Its state (empty before training) is not
  carried over;
- an optimizer class or a ``functools.partial`` of one (``partial(torch.optim.SGD, lr=0.1)``):
  called with the trainable parameters;
- any other callable: called with the module (wrapped or sharded, the parameter names unchanged):
  ``lambda model: torch.optim.SGD(model.parameters(), lr=0.1)``.

Frozen parameters (``requires_grad=False``, ``model.freeze``) are left out of its groups, as
dist_train's own optimizer leaves them out (DeepSpeed's ZeRO optimizers cannot hold them, nor an
empty group). The scheduler (``OwnScheduler``) is a callable ``optimizer -> LRScheduler``, stepped
once per optimizer step (or per epoch: ``train.scheduler_interval``), its state checkpointed in
``meta.json`` (numbers, strings, lists and dicts, as torch's schedulers' are: checked before the
run). Without one, ``train.schedule`` (with its warmup)
scales the own optimizer's learning rates, one factor for every group.
"""
from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from dist_train.config.schema import ConfigError
from dist_train.strategy.base import decode_state, encode_state
from dist_train.train.optim import GROUP_NAMES

Scheduler = torch.optim.lr_scheduler.LRScheduler


def _optimizer_class(spec: Any) -> Optional[type]:
    """The optimizer class of ``spec`` when it is one or a ``functools.partial`` of one."""
    target = spec.func if isinstance(spec, functools.partial) else spec
    return target if isinstance(target, type) and issubclass(target, torch.optim.Optimizer) else None


class OwnOptimizer:
    """``make(module) -> optimizer`` from a user's optimizer, optimizer class or factory (see the
    module's docstring). ``model``: what was given to ``fit`` as the model (an instance is needed
    to rebuild an optimizer instance: its parameters are found there by name)."""

    def __init__(self, spec: Any, model: Any = None, precision: str = "fp32"):
        self.spec, self.groups, self.defaults, self.precision = spec, None, None, precision
        if isinstance(spec, torch.optim.Optimizer):
            self.cls = type(spec)
            self.groups, self.defaults = self._groups_by_name(spec, model), dict(spec.defaults)
        elif _optimizer_class(spec) is not None:
            self.cls = _optimizer_class(spec)
        elif callable(spec):
            self.cls = None
        else:
            raise ConfigError("optimizer", "must be a torch.optim.Optimizer built over the model's parameters, an "
                                           "optimizer class, or a callable model -> optimizer; got "
                                           f"{type(spec).__name__}")
        self.name = self.cls.__name__ if self.cls else getattr(spec, "__name__", "optimizer")

    @staticmethod
    def _groups_by_name(optimizer: torch.optim.Optimizer, model: Any) -> List[Dict[str, Any]]:
        if not isinstance(model, nn.Module):
            raise ConfigError("optimizer", f"an optimizer instance ({type(optimizer).__name__}) is rebuilt over the "
                                           "trained parameters by their names in the model it was built on: pass "
                                           "that model instance to fit, or optimizer=lambda model: "
                                           f"{type(optimizer).__name__}(model.parameters(), ...)")
        names = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for i, group in enumerate(optimizer.param_groups):
            missing = sum(id(p) not in names for p in group["params"])
            if missing:
                raise ConfigError("optimizer", f"param group {i} of the {type(optimizer).__name__} holds {missing} "
                                               "parameter(s) that are not the model's: build it over "
                                               "model.parameters() of the model passed to fit")
            settings = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
            if "initial_lr" in group:  # (a scheduler built over it before fit set lr to its first value)
                settings["lr"] = group["initial_lr"]
            groups.append({**settings, "params": [names[id(p)] for p in group["params"]]})
        return groups

    def describe(self, model: Any) -> str:
        """The optimizer's class name; a factory's is found by calling it over ``model`` (an
        instance: building an optimizer over its parameters changes nothing in them)."""
        if self.cls is None and isinstance(model, nn.Module):
            try:
                return type(self.spec(model)).__name__
            except Exception:  # noqa: BLE001  (the run will say what is wrong with it)
                pass
        return self.name

    def __call__(self, module: Any) -> torch.optim.Optimizer:
        named = list(module.named_parameters()) if isinstance(module, nn.Module) else None
        if self.groups is not None:
            params = dict(named or ())
            groups = [{**g, "params": [params[n] for n in g["params"]]} for g in self.groups]
            try:
                optimizer = self.cls(groups, **_constructor_arguments(self.cls, self.defaults))
            except TypeError as exc:
                raise ConfigError("optimizer", f"{self.name} cannot be rebuilt from its defaults ({exc}): pass "
                                               f"optimizer=lambda model: {self.name}(model.parameters(), ...)") from None
        elif self.cls is not None:
            trainable = [p for _, p in named] if named is not None else list(module)
            optimizer = self.spec([p for p in trainable if p.requires_grad])
        else:
            optimizer = self.spec(module)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError("optimizer", f"{self.name}(model) must return a torch.optim.Optimizer; got "
                                           f"{type(optimizer).__name__}")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ConfigError("optimizer", "LBFGS steps with a closure that evaluates the model again; the strategy's "
                                           "optimizer step (one forward and backward per step, gradients reduced "
                                           "across ranks) gives none")
        _drop_frozen(optimizer)
        self._check_fused(optimizer)
        if named is not None:  # (checkpoints record the groups by name: a resume needs the same)
            by_id = {id(p): n for n, p in named}
            if all(id(p) in by_id for g in optimizer.param_groups for p in g["params"]):
                setattr(optimizer, GROUP_NAMES, [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups])
        return optimizer


    def _check_fused(self, optimizer: torch.optim.Optimizer) -> None:
        """torch's fused kernels over FSDP's DTensor shards: refused where they fail (the CPU, where
        the fused kernel aborted a worker; fp16, where ShardedGradScaler's scale meets a shape
        mismatch); dist_train's own optimizer takes foreach there."""
        from torch.distributed.tensor import DTensor

        for group in optimizer.param_groups:
            sharded = [p for p in group["params"] if isinstance(p, DTensor)]
            if group.get("fused") and sharded and (sharded[0].device.type == "cpu" or self.precision == "fp16"):
                raise ConfigError("optimizer", f"{type(optimizer).__name__}(fused=True) over FSDP's sharded "
                                               f"parameters fails {'on the CPU' if sharded[0].device.type == 'cpu' else 'under fp16'}: "
                                               "leave fused unset, or pass foreach=True")


def _constructor_arguments(cls: type, defaults: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of an optimizer's ``defaults`` that its constructor takes: AdamW keeps
    ``decoupled_weight_decay`` there but sets it itself (each param group carries every setting
    anyway)."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return dict(defaults)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params}


def _drop_frozen(optimizer: torch.optim.Optimizer) -> None:
    """Frozen parameters out of ``optimizer``'s groups, and groups left empty out of it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                optimizer.state.pop(p, None)  # (Adagrad makes its state in its constructor)
        group["params"] = [p for p in group["params"] if p.requires_grad]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    if not optimizer.param_groups:
        raise ConfigError("optimizer", "holds no trainable parameter (every one is frozen)")


class OwnScheduler:
    """``make(optimizer) -> scheduler`` from a user's callable ``optimizer -> LRScheduler``."""

    def __init__(self, spec: Any, interval: str = "step"):
        self.interval = interval  # train.scheduler_interval
        if isinstance(spec, (Scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
            raise ConfigError("scheduler", f"a {type(spec).__name__} instance is bound to the optimizer it was built "
                                           "over, which is rebuilt over the trained parameters: pass "
                                           f"scheduler=lambda optimizer: {type(spec).__name__}(optimizer, ...)")
        if not callable(spec):
            raise ConfigError("scheduler", f"must be a callable optimizer -> LRScheduler; got {type(spec).__name__}")
        self.spec = spec

    def __call__(self, optimizer: torch.optim.Optimizer) -> Scheduler:
        return check_scheduler(self.spec(optimizer), optimizer, self.interval)


def check_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, interval: str = "step") -> Scheduler:
    """``scheduler`` as the loop steps it (no argument; per optimizer step, or per epoch by its
    ``last_epoch``) and checkpoints it (its state in ``meta.json``, losslessly: see
    ``strategy.base.encode_state``); a ConfigError naming the problem otherwise."""
    name = type(scheduler).__name__
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError("scheduler", "ReduceLROnPlateau steps on a metric, not once per optimizer step: use a "
                                       "schedule of steps (train.schedule=..., or a scheduler of your own such as "
                                       "StepLR, OneCycleLR, CosineAnnealingLR)")
    if not isinstance(scheduler, Scheduler):
        raise ConfigError("scheduler", f"must return a torch.optim.lr_scheduler.LRScheduler; got {name}")
    if scheduler.optimizer is not optimizer:
        raise ConfigError("scheduler", f"the {name} returned is not over the optimizer it was given")
    state = scheduler.state_dict()
    try:
        kept = decode_state(json.loads(json.dumps(encode_state(state))))
    except (TypeError, ValueError) as exc:
        raise ConfigError("scheduler", f"the state of {name} cannot be checkpointed as JSON ({exc}): a scheduler's "
                                       "state_dict() must hold numbers, strings, lists and dicts") from None
    if not _same(kept, state):
        raise ConfigError("scheduler", f"the state of {name} does not come back whole from JSON (meta.json keeps it): "
                                       f"{sorted(k for k in state if not _same(kept.get(k), state[k]))}")
    if interval == "epoch" and not hasattr(scheduler, "last_epoch"):
        raise ConfigError("train.scheduler_interval", f"epoch: the loop counts the epochs a scheduler has stepped by "
                                                      f"its last_epoch, which {name} does not have")
    return scheduler


def _same(a: Any, b: Any) -> bool:
    """Equal as a scheduler's state is compared after a round trip (a tuple comes back a list)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)
    except Exception:  # noqa: BLE001  (tensors and the like: not JSON to begin with)
        return False


def probe_scheduler(spec: OwnScheduler, optimizer: Optional[OwnOptimizer], model: Any) -> str:
    """Before any process group: ``spec`` built over a throwaway optimizer (of the user's groups and
    learning rates when the optimizer is an instance over ``model``, else one group), so that a
    scheduler the loop cannot step or checkpoint is refused then. A factory that fails on the
    throwaway optimizer (it expects other groups) is left to the run. Returns the scheduler's
    class name (``scheduler`` when the probe could not build it)."""
    if optimizer is not None and optimizer.groups is not None:
        params = dict(model.named_parameters())
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [params[n] for n in g["params"]]}
                  for g in optimizer.groups]
        try:
            probe = torch.optim.SGD(groups, lr=0.1)
        except Exception:  # noqa: BLE001  (settings SGD does not take: the run will tell)
            return "scheduler"
    else:
        probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    try:
        built = spec.spec(probe)
    except Exception:  # noqa: BLE001
        return "scheduler"
    return type(check_scheduler(built, probe, spec.interval)).__name__

