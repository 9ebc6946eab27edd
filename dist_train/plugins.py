"""Users' own models, datasets and tasks, reached by name from the config (and by ``fit``).

A name in ``model.name``, ``data.name`` or ``task.name`` is, in this order:

1. a built-in (``cnn``, ``fashion_mnist``, ``classification``, ...);
2. one registered by a decorator: ``@dist_train.register_model("net")``, ``register_dataset``,
   ``register_task``;
3. one a package declares as a Python entry point (groups ``dist_train.models``,
   ``dist_train.datasets``, ``dist_train.tasks``);
4. an import path ``pkg.module:attr`` (the working directory is importable);
5. for models, ``torchvision:<name>``: a classification model of the torchvision zoo, built with
   the dataset's class count and ``model.args`` (weights never downloaded: see ``model.init_from``).

Builders: a model builder is ``fn(args, info) -> nn.Module`` (``args``: the free-form
``model.args``; ``info``: the dataset description), a dataset builder ``fn(args) -> (train, eval)``
or ``(train, eval, {"task": ..., "num_classes": ...})``; builders taking fewer parameters get
fewer. Every failure (no such module, a missing attribute, a builder that raises or returns the
wrong type) is a ConfigError naming the key and the cause.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import sysconfig
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from dist_train.config.schema import ConfigError

GROUPS = {"model.name": "dist_train.models", "data.name": "dist_train.datasets", "task.name": "dist_train.tasks"}
_USER: Dict[str, Dict[str, Callable]] = {key: {} for key in GROUPS}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model builder and the task know about a dataset (duck-types the built-ins' DataInfo)."""

    task: str = "classification"
    input_shape: Optional[Tuple[int, ...]] = None
    num_classes: Optional[int] = None
    seq_len: Optional[int] = None
    bytes_per_token: Optional[float] = None
    collate_fn: Optional[Callable] = None  # a list of items -> a batch (default: torch's default_collate)


def _register(key: str, name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        _USER[key][name] = fn
        return fn

    return decorator


def register_model(name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(args, info) -> nn.Module`` becomes ``model.name=<name>``."""
    return _register("model.name", name)


def register_dataset(name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(args) -> (train, eval)`` becomes ``data.name=<name>``."""
    return _register("data.name", name)


def import_path(spec: str, key: str) -> Any:
    """The object ``pkg.module:attr`` names (``attr`` may be dotted)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(key, f"{spec!r} is not an import path; write package.module:attribute")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's project, run from its root
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001  (ImportError, or the module itself failed)
        raise ConfigError(key, f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(key, f"{spec} is a {type(obj).__name__}, not a callable")
    return obj


def _entry_point(key: str, name: str) -> Optional[Callable]:
    from importlib.metadata import entry_points

    for ep in entry_points(group=GROUPS[key]):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(key, f"entry point {ep.name} = {ep.value} does not load: "
                                  f"{type(exc).__name__}: {exc}") from None
    return None


def user_callable(key: str, name: str) -> Optional[Callable]:
    """The decorator-registered, entry-point or import-path object ``name`` denotes (None: none)."""
    if name in _USER[key]:
        return _USER[key][name]
    found = _entry_point(key, name)
    if found is not None:
        return found
    if ":" in name and not name.startswith("torchvision:"):
        return import_path(name, key)
    return None


def call_builder(fn: Callable, key: str, *args: Any) -> Any:
    """Call a user builder with as many of ``args`` as it takes; its exception becomes a ConfigError."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes = len(args) if any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values()) \
            else min(len(params), len(args))
    except (TypeError, ValueError):  # builtins without a signature
        takes = len(args)
    try:
        return fn(*args[:takes])
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(key, f"the builder {getattr(fn, '__qualname__', fn)!r} failed: "
                          f"{type(exc).__name__}: {exc}{_raised_at(exc)}") from exc


def _raised_at(exc: BaseException) -> str:
    """Where in the user's own code ``exc`` was raised (`` (raised at FILE:LINE, in FUNCTION)``):
    an exit-2 message is one line without a traceback, and should still say where to look. The
    deepest frame outside dist_train, installed packages and the standard library; else the
    deepest frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    here = os.path.dirname(os.path.abspath(__file__))
    library = tuple({sysconfig.get_path("stdlib"), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
                    - {None})
    own = [f for f in frames if not os.path.abspath(f.filename).startswith((here, *library))]
    frame = (own or frames or [None])[-1]
    return "" if frame is None else f" (raised at {frame.filename}:{frame.lineno}, in {frame.name})"


def torchvision_model(name: str, args: Dict[str, Any], info) -> Any:
    """``torchvision:<name>`` with the dataset's class count (``model.args`` may override it)."""
    import torchvision

    zoo = name.partition(":")[2]
    if zoo not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError("model.name", f"torchvision has no classification model {zoo!r}; e.g. resnet18, "
                          "resnet50, mobilenet_v3_small, vit_b_16")
    kwargs = dict(args)
    if getattr(info, "num_classes", None) and "num_classes" not in kwargs:
        kwargs["num_classes"] = info.num_classes
    kwargs["weights"] = None  # no downloads at run time: pretrained weights come from model.init_from
    try:
        model = torchvision.models.get_model(zoo, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError("model.args", f"torchvision:{zoo} cannot be built with {dict(args)}: "
                          f"{type(exc).__name__}: {exc}") from None
    return _fit_input_channels(model, zoo, getattr(info, "input_shape", None))


def _gray_to_rgb(_module, args):
    x = args[0]
    return (x.expand(-1, 3, *x.shape[2:]), *args[1:]) if x.dim() == 4 and x.shape[1] == 1 else args


def _fit_input_channels(model, zoo: str, input_shape) -> Any:
    """The zoo's models take 3-channel images. Grayscale ones (fashion_mnist, digits) are repeated
    to three channels on the way in, as ``transforms.Grayscale(num_output_channels=3)`` would: a
    forward pre-hook, so the state dict stays torchvision's (``model.init_from`` of ImageNet
    weights, ``model.freeze`` patterns). Any other mismatch is refused naming both counts."""
    import torch.nn as nn

    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or not input_shape or len(input_shape) != 3 or input_shape[0] == first.in_channels:
        return model
    if input_shape[0] == 1 and first.in_channels == 3:
        import logging

        logging.getLogger("dist_train").info("torchvision:%s takes 3-channel images: the dataset's 1-channel images "
                                             "are repeated to 3 channels on the way in", zoo)
        model.register_forward_pre_hook(_gray_to_rgb)
        return model
    raise ConfigError("model.name", f"torchvision:{zoo} takes {first.in_channels}-channel images; the dataset's have "
                      f"{input_shape[0]} (shape {tuple(input_shape)})")


def check_name(key: str, name: str, builtins) -> None:
    """Preflight: ``name`` must resolve (the builder is imported, not called)."""
    if name in builtins:
        return
    if key == "model.name" and name.startswith("torchvision:"):
        import torchvision

        if name.partition(":")[2] not in torchvision.models.list_models(module=torchvision.models):
            raise ConfigError(key, f"torchvision has no classification model {name.partition(':')[2]!r}")
        return
    if user_callable(key, name) is None:
        raise ConfigError(key, f"unknown name {name!r}: not built in ({', '.join(sorted(builtins))}), not registered, "
                          f"not an entry point of group {GROUPS[key]}, and not an import path package.module:attr")
