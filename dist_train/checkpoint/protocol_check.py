"""DCP's test "is this a CheckpointableTensor?", answered without typing's slow path.

torch.distributed.checkpoint asks ``_is_checkpointable_tensor(obj)`` about every value of a state
dict, twice per save and twice per load (planning, then building the items). It is
``isinstance(obj, CheckpointableTensor)``, a ``typing.Protocol`` checked at run time, which Python
3.11 answers by recomputing the protocol's attribute names at every call: about 11 us here, so
1-1.5 ms of every save and load of a small model's checkpoint and 20-25 ms of a ResNet-50's
(Python 3.12 caches them).

``install`` replaces DCP's function (in the modules that imported it) by one that gives the same
answer: for the tensor types DCP meets (``torch.Tensor``, ``nn.Parameter``, ``DTensor``), which
neither subclass nor register the protocol, an object is a CheckpointableTensor exactly when it
has the protocol's attributes, and one without ``global_shape`` lacks them; anything else (a tensor
carrying the attributes, another subclass) goes to DCP's own function, and so does everything
while a virtual subclass is registered with the protocol. Installed only on Python < 3.12 and only
where the protocol's attributes are the four this was written against.
"""
from __future__ import annotations

import abc
import sys
import typing
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

_PLAIN_TYPES = (torch.Tensor, nn.Parameter, DTensor)
_ATTRIBUTES = {"global_shape", "global_offsets", "local_offsets", "local_sizes"}  # (the protocol's, checked)
_original: Optional[Callable[[Any], bool]] = None
_protocol: Any = None
_token: Any = None  # abc's cache token when the protocol was last seen without virtual subclasses


def is_checkpointable_tensor(obj: Any) -> bool:
    """``torch.distributed.checkpoint.protocol._is_checkpointable_tensor(obj)``, faster."""
    if type(obj) in _PLAIN_TYPES and not hasattr(obj, "global_shape") and _unregistered():
        return False
    return _original(obj)  # type: ignore[misc]


def _unregistered() -> bool:
    """No virtual subclass registered with the protocol (checked again whenever any ABC
    registration anywhere has changed abc's cache token: a C call otherwise)."""
    global _token
    token = abc.get_cache_token()
    if token == _token:
        return True
    if _registered(_protocol):
        return False
    _token = token
    return True


def install() -> bool:
    """Put ``is_checkpointable_tensor`` in DCP's place (see the module docstring); whether it is."""
    global _original, _protocol
    if sys.version_info >= (3, 12):
        return False  # (typing caches the protocol's attributes there)
    try:
        from torch.distributed.checkpoint import default_planner, planner_helpers, protocol
        from torch.distributed.checkpoint import utils as dcp_utils
    except ImportError:
        return False
    original = getattr(protocol, "_is_checkpointable_tensor", None)
    if original is is_checkpointable_tensor:
        return True
    cls = getattr(protocol, "CheckpointableTensor", None)
    try:
        attributes = set(typing._get_protocol_attrs(cls))  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001  (not the protocol this was written against)
        return False
    if original is None or attributes != _ATTRIBUTES:
        return False
    _original, _protocol = original, cls
    for module in (protocol, default_planner, planner_helpers, dcp_utils):
        if getattr(module, "_is_checkpointable_tensor", None) is original:
            module._is_checkpointable_tensor = is_checkpointable_tensor
    return True


def _registered(protocol_class: Any) -> bool:
    """Whether anything was registered as a virtual subclass of the protocol (then an object of
    a plain type might be one without its attributes: keep DCP's own test)."""
    if protocol_class is None:
        return True
    try:
        registry = abc._get_dump(protocol_class)[0]  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return True
    return bool(registry)
