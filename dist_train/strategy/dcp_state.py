"""How the torch-native strategies (single, DDP, FSDP) put their state into a checkpoint.

``get_state_dict`` strips wrapper prefixes (DDP's ``module.``) and keeps FSDP's sharded DTensors,
so one checkpoint loads under single, DDP and FSDP at any world size: DCP reads exactly the
pieces each rank's tensors need.

``get_state_dict`` rebuilds its name mappings from the module tree at every call (6 ms for a
ResNet-18, 14 ms for a ResNet-50 here: more than copying its state to host memory), and a save
or resume needs it. ``full_state`` calls it once per model and optimizer, then gives the same
result from ``model.state_dict()`` and ``optimizer.state_dict()`` with the renames it learned
(``_Replay``): checked equal to ``get_state_dict``'s output when learned, used only while the
model's state-dict keys, its named parameters and the optimizer's parameters are the very ones
it learned from (else learned again from a fresh ``get_state_dict``).
"""
from __future__ import annotations

import logging
import weakref
from itertools import chain
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


log = logging.getLogger(__name__)

#: Wrapper modules whose attribute names DCP drops from state-dict keys: DDP's, torch.compile's and the
#: activation-checkpoint wrapper's (a user's own submodule of such a name: see ``_Replay.learn``).
_WRAPPERS = ("module", "_orig_mod", "_checkpoint_wrapped_module")


def full_state(model: nn.Module, optimizer) -> Dict[str, Any]:
    """Model and optimizer state in the form torch.distributed.checkpoint saves: exactly what
    ``get_state_dict(model, optimizer)`` returns (see the module docstring)."""
    return _full_state(model, optimizer)[0]


def _full_state(model: nn.Module, optimizer) -> Tuple[Dict[str, Any], Optional[_Replay]]:
    """``full_state``, and the replay that reproduces it for this very model and optimizer (None:
    ``get_state_dict``'s own result, not replayed)."""
    replay = _replays.get(optimizer, _UNSEEN)
    state = replay.state(model, optimizer) if isinstance(replay, _Replay) else None
    if state is not None:
        return state, replay
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    # First seen, or changed since: learn (again); None: not replayable. Not while the optimizer
    # has no state (get_state_dict leaves it empty when gradients exist): later.
    learned = None
    if replay is not None and optimizer.state:
        learned = _replays[optimizer] = _Replay.learn(model, optimizer, state)
    return state, learned


class _Replay:
    """``get_state_dict``'s renames for one model and optimizer: model keys without wrapper
    names (in its order: a renamed key moves to the end), optimizer parameter ids as names."""

    def __init__(self, model: nn.Module, optimizer, renames: Dict[str, str]):
        self.keys = tuple(model.state_dict().keys())
        self.renames = renames
        self.named = [(name, p) for name, p in model.named_parameters()]
        self.params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
        names = {id(p): _canonical(name) for name, p in self.named}
        self.names: List[str] = [names.get(id(p), "") for p in self.params]  # by optimizer parameter id

    @classmethod
    def learn(cls, model: nn.Module, optimizer, reference: Dict[str, Any]) -> "Optional[_Replay]":
        """The replay of ``reference`` (``get_state_dict``'s output just now), if it reproduces it."""
        try:
            keys = model.state_dict().keys()
            replay = cls(model, optimizer, {k: _canonical(k) for k in keys if _canonical(k) != k})
            again = replay.state(model, optimizer)
            if again is not None and _same(again, reference):
                return replay
        except Exception as exc:  # noqa: BLE001  (a model this cannot replay: get_state_dict it is)
            log.debug("state dict replay not learned: %s", exc)
        log.debug("state dict: get_state_dict at every save (its result is not replayed here)")
        return None

    def current(self, model: nn.Module, optimizer) -> Optional[Dict[str, Any]]:
        """``model.state_dict()`` when the model and optimizer are still those learned from (the
        same state-dict keys, named parameters and optimized parameters), else None."""
        if not optimizer.state:  # get_state_dict would initialise it first
            return None
        params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
        if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            return None
        # state_dict() first: FSDP2's pre-hook registers the sharded parameters again (after a
        # forward without resharding the module holds the unsharded ones).
        model_sd = model.state_dict()
        if tuple(model_sd.keys()) != self.keys:
            return None
        named = list(model.named_parameters())
        if len(named) != len(self.named) or any(a[0] != b[0] or a[1] is not b[1] for a, b in zip(named, self.named)):
            return None
        return model_sd

    def state(self, model: nn.Module, optimizer) -> Optional[Dict[str, Any]]:
        """``get_state_dict``'s result, or None when the model or optimizer changed since."""
        model_sd = self.current(model, optimizer)
        if model_sd is None:
            return None
        for key in self.keys:
            if key in self.renames:
                model_sd[self.renames[key]] = model_sd.pop(key)
        osd = optimizer.state_dict()
        states = osd["state"]
        for pid in list(states):
            if not self.names[pid]:
                return None  # an optimized parameter that is not the model's
            states[self.names[pid]] = states.pop(pid)
        for group in osd["param_groups"]:
            group["params"] = [self.names[pid] for pid in group["params"]]
        return {"model": model_sd, "optim": {"state": states, "param_groups": osd["param_groups"]}}

    def same_groups(self, optimizer, optim_state: Dict[str, Any]) -> bool:
        """Whether the loaded optimizer state's groups name exactly this optimizer's parameters,
        group by group and in order (its ``param_groups`` come from the checkpoint: a run saved
        with other groups, another weight-decay split or other trainable parameters, differs).
        Only then is ``optimizer.load_state_dict``'s mapping by position ``set_state_dict``'s
        mapping by name."""
        groups = optim_state.get("param_groups") if isinstance(optim_state, dict) else None
        if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
            return False
        start = 0
        for loaded, group in zip(groups, optimizer.param_groups):
            names = self.names[start:start + len(group["params"])]
            start += len(group["params"])
            if not isinstance(loaded, dict) or list(loaded.get("params", ())) != names:
                return False
        return True

    def load(self, model: nn.Module, optimizer, state: Dict[str, Any]) -> None:
        """``set_state_dict`` of ``state`` (in ``get_state_dict``'s form, as ``state`` gives it):
        the model's keys renamed back, then what ``set_state_dict`` ends with for a model that is
        not FSDP1: ``model.load_state_dict`` and ``optimizer.load_state_dict`` (which maps the
        optimizer state's parameter names to its parameters by their order in the groups)."""
        back = {new: old for old, new in self.renames.items()}
        model.load_state_dict({back.get(key, key): value for key, value in state["model"].items()})
        optimizer.load_state_dict(state["optim"])


_replays: "weakref.WeakKeyDictionary[Any, Optional[_Replay]]" = weakref.WeakKeyDictionary()
_UNSEEN = object()


def _canonical(key: str) -> str:
    """A state-dict key or parameter name without the wrapper names of ``_WRAPPERS``."""
    parts = key.split(".")
    return ".".join(p for p in parts if p not in _WRAPPERS) if any(p in _WRAPPERS for p in parts) else key


def _same(a: Any, b: Any) -> bool:
    """The same state-dict tree: equal keys in the same order, the same tensors (same memory,
    layout and kind), equal other leaves."""
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a.keys()) == list(b.keys())
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        if type(a) is not type(b):
            return False
        if hasattr(a, "to_local"):
            if a._spec != b._spec:
                return False
            a, b = a.to_local(), b.to_local()
        return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
                and a.storage_offset() == b.storage_offset()
                and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    return type(a) is type(b) and a == b


# Optimizer settings that choose kernels, not state: those of this run, whatever the checkpoint says.
_KERNEL_FLAGS = ("fused", "foreach")
_built_kernels: "weakref.WeakKeyDictionary[Any, List[Dict[str, Any]]]" = weakref.WeakKeyDictionary()


def kernels_as_built(optimizer) -> List[Dict[str, Any]]:
    """Each group's kernel flags as the optimizer was built, taken before its first load (a later
    load, e.g. a rollback after a load that failed half-way, must not take the checkpoint's)."""
    if optimizer not in _built_kernels:
        _built_kernels[optimizer] = [{k: g.get(k) for k in _KERNEL_FLAGS} for g in optimizer.param_groups]
    return _built_kernels[optimizer]


def keep_kernels(optimizer, chosen: List[Dict[str, Any]]) -> None:
    """After ``optimizer.load_state_dict`` (which takes every group setting from the checkpoint):
    each group runs the kernels this run chose (``chosen``: its groups' flags before the load),
    not those of the run that wrote the checkpoint on another device or strategy (a GPU's fused
    kernel on CPU shards, or a CPU run's loop on a GPU); Adam's ``step`` counters go where the
    kernel wants them (the parameter's device when fused or capturable, else the host)."""
    for group, flags in zip(optimizer.param_groups, chosen):
        if all(group.get(k) == v for k, v in flags.items()):
            continue
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(p.device if on_device else torch.device("cpu"))


def load_full_state(files, model: nn.Module, optimizer) -> None:
    seeded = not optimizer.state and seed_optimizer_state(model, optimizer, files.metadata())
    chosen = kernels_as_built(optimizer)
    try:
        state, replay = _full_state(model, optimizer)
        files.read_state(state, adopt=True)  # (the values are taken from ``state`` below)
        if replay is not None and replay.same_groups(optimizer, state["optim"]):
            replay.load(model, optimizer, state)  # (set_state_dict rebuilds its name maps: 10 ms for a ResNet-18)
        else:
            # Not strict: a trainable parameter that never had a gradient (an unused head) has no
            # optimizer state in the checkpoint, and gets none, as with optimizer.load_state_dict.
            # (The model's keys are its own: the read above fails on any the checkpoint lacks.)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=_NOT_STRICT)
        keep_kernels(optimizer, chosen)
    except BaseException:
        if seeded:  # (back to the fresh optimizer it was: no half-loaded or unfilled state stays)
            optimizer.state.clear()
        raise


_NOT_STRICT = StateDictOptions(strict=False)


def seed_optimizer_state(model: nn.Module, optimizer, metadata: Any) -> bool:
    """Give a fresh optimizer (no state yet: a process about to resume) the state tensors its
    checkpoint holds, uninitialised, for the load to read into. Returns whether it did.

    Without state, DCP's ``get_state_dict`` and ``set_state_dict`` create it by running an
    optimizer step with zero gradients and a learning rate of 0 (``_init_optim_state``): for AdamW
    that zero-fills two tensors per parameter and runs a full step over them, only for the load to
    overwrite every value (a 1 GB checkpoint's first resume: 640 ms of its 830, against 590 ms for
    ``torch.load`` of the same state). Here the state is built the way ``torch.load`` +
    ``optimizer.load_state_dict`` builds it: exactly the entries the checkpoint stores (its DCP
    index names them), each a tensor of the stored dtype laid out as its parameter (on its device,
    sharded as it is: a DTensor for an FSDP parameter), or a 0-d tensor (a ``step``), or a
    placeholder for a non-tensor entry; ``optimizer.load_state_dict`` then casts and places them
    as it does any loaded state. All or nothing: any stored entry this cannot place (an unknown
    parameter name, nested state, a tensor shaped unlike its parameter, an index without DCP's key
    paths) leaves the optimizer untouched, and DCP initialises it its own way."""
    try:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        from torch.distributed.checkpoint.state_dict import _get_fqns  # (DCP's own parameter names)
    except ImportError:
        return False
    paths = getattr(metadata, "planner_data", None)
    if optimizer.state or not isinstance(paths, dict):
        return False
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    by_name: Dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if id(param) in held:
            fqns = _get_fqns(model, name)
            if len(fqns) != 1:
                return False
            by_name[next(iter(fqns))] = param
    if len(by_name) != len(held):
        return False  # (an optimized tensor that is not one of the model's parameters)
    stored: Dict[str, Dict[str, Any]] = {}
    for key, meta in metadata.state_dict_metadata.items():
        path = paths.get(key)
        if path is None:
            if key.startswith("optim.state."):
                return False
            continue
        if tuple(path[:2]) != ("optim", "state"):
            continue
        if len(path) != 4 or path[2] not in by_name or not isinstance(path[3], str):
            return False
        stored.setdefault(path[2], {})[path[3]] = meta
    seeds: Dict[torch.Tensor, Dict[str, Any]] = {}
    for name, entries in stored.items():
        param, values = by_name[name], {}
        for key, meta in entries.items():
            if not isinstance(meta, TensorStorageMetadata):
                values[key] = None  # (a number or the like: the load puts the stored value here)
            elif tuple(meta.size) == tuple(param.shape):
                values[key] = torch.empty_like(param, dtype=meta.properties.dtype, requires_grad=False)
            elif len(meta.size) == 0:
                values[key] = torch.empty((), dtype=meta.properties.dtype)
            else:
                return False
        seeds[param] = values
    if not seeds:
        return False
    optimizer.state.update(seeds)
    return True


def load_model_state(files, model: nn.Module) -> None:
    state = {"model": get_model_state_dict(model)}
    files.read_state(state, adopt=True)
    set_model_state_dict(model, state["model"])


def model_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """``{name: global shape}`` of the model's tensors, named as ``get_model_state_dict`` names them
    (each ``model.state_dict()`` key through DCP's ``_get_fqns``, as it does, without the name maps
    of every parameter and module it builds first: 6 ms for a ResNet-18)."""
    from torch.distributed.checkpoint.state_dict import _get_fqns

    out: Dict[str, Tuple[int, ...]] = {}
    for key, value in model.state_dict().items():
        fqns = _get_fqns(model, key)
        if len(fqns) != 1:  # (an FSDP1 flat parameter: DCP's own way)
            return {k: tuple(v.shape) for k, v in get_model_state_dict(model).items() if isinstance(v, torch.Tensor)}
        if isinstance(value, torch.Tensor):
            out[next(iter(fqns))] = tuple(value.shape)
    return out


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
