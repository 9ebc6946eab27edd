"""Optimizer and learning-rate schedule, built from the ``train`` section.

Both are returned as factories: the strategy calls them after it has wrapped or sharded the
model, because FSDP and DeepSpeed replace the parameters the optimizer must hold.

Every schedule is one ``LambdaLR`` over :func:`lr_factor`, so any strategy (DeepSpeed included)
steps it and checkpoints its state the same way. Its values equal torch's own schedulers step
by step (tests/test_optim.py), with the warmup as ``SequentialLR``'s first phase:

    warmup    LinearLR(start_factor=1/warmup_steps, total_iters=warmup_steps - 1)
    cosine    CosineAnnealingLR(T_max=max_steps - warmup_steps, eta_min=min_lr_ratio * lr)
    linear    LinearLR(1.0, min_lr_ratio, total_iters=max_steps - warmup_steps)
    constant  ConstantLR(factor=1.0)
    step      StepLR(step_size, gamma)
    multistep MultiStepLR(milestones, gamma)
    exponential ExponentialLR(gamma)

The schedule after warmup counts its steps from the end of the warmup (as ``SequentialLR``
restarts its second scheduler there).
"""
from __future__ import annotations

import bisect
import fnmatch
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dist_train.config.schema import ConfigError


Named = List[Tuple[Optional[str], nn.Parameter]]
GROUP_NAMES = "dist_train_group_names"  # an optimizer's param groups as parameter names (set by make)


def named_parameters(source: Any) -> Named:
    """``(name, parameter)`` pairs of what a strategy hands the optimizer factory: its module
    (wrapped or sharded, the names unchanged), or, from a strategy of one's own, an iterable of
    parameters (names unknown: None) or of pairs."""
    if isinstance(source, nn.Module):
        return list(source.named_parameters())
    return [item if isinstance(item, tuple) else (None, item) for item in source]


def lr_scale_of(name: str, scales: Dict[str, float]) -> float:
    """``train.lr_scale``'s multiplier for parameter ``name``: the first pattern it matches, else 1."""
    return next((float(s) for pattern, s in scales.items() if fnmatch.fnmatchcase(name, pattern)), 1.0)


def unmatched_pattern(names: List[str], patterns: Iterable[str], what: str = "parameter") -> Optional[str]:
    """Why glob ``patterns`` of parameter names (``model.freeze``, ``train.lr_scale``) are wrong
    for a model whose ``what``s have these names (a pattern that matches none of them), else None."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return (f"{pattern!r} matches no {what}; names look like "
                    f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    return None


def param_groups(params: Any, cfg) -> List[Dict[str, Any]]:
    """The trainable parameters as optimizer param groups.

    ``params``: a module, or parameters (see :func:`named_parameters`). ``train.lr_scale``: the
    parameters each pattern matches first get a group of their own with ``lr = train.lr x
    multiplier`` (the schedule scales every group's learning rate alike); the rest stay in the
    first group, at ``train.lr`` (the ``lr`` logged is the first group's: ``train.lr``'s unless
    every trainable parameter is scaled). ``train.decay_norm_and_bias=false``: each of
    those is split in two, the biases and normalisation weights (every parameter with
    ``ndim <= 1``) with ``weight_decay=0``. ``ndim`` is the full parameter's, also for FSDP's
    DTensor shards, so every rank sorts the same way. Empty groups are dropped (DeepSpeed's ZeRO
    optimizers cannot flatten one).
    """
    named = [(n, p) for n, p in named_parameters(params) if p.requires_grad]
    scales = dict(getattr(cfg, "lr_scale", None) or {})
    if scales:
        if any(n is None for n, _ in named):
            raise ConfigError("train.lr_scale", "needs the parameters' names: this strategy hands the optimizer "
                                                "bare parameters (a strategy of one's own: hand it the module)")
        problem = unmatched_pattern([n for n, _ in named], scales, "trainable parameter")
        if problem:
            raise ConfigError("train.lr_scale", problem)
    split = not (cfg.decay_norm_and_bias or cfg.weight_decay == 0)
    groups: Dict[Tuple[float, bool], List[nn.Parameter]] = {(1.0, True): []}  # (the first: train.lr, decayed)
    for name, p in named:
        key = (lr_scale_of(name, scales) if scales else 1.0, not split or p.ndim >= 2)
        groups.setdefault(key, []).append(p)
    out = []
    for (scale, decayed), members in sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, not kv[0][1])):
        group: Dict[str, Any] = {"params": members}
        if scale != 1.0:
            group["lr"] = cfg.lr * scale
        if not decayed:
            group["weight_decay"] = 0.0
        out.append(group)
    return [g for g in out if g["params"]]


# Devices whose Adam/AdamW get torch's fused kernel (one kernel for every parameter of a step).
# CPU included: there it is 3-4x faster than foreach (a ResNet-18's AdamW step: 26 -> 7 ms on 2
# cores) and 5x faster than the loop torch runs by default. (torch >= 2.4 has both.)
FUSED_DEVICES = ("cuda", "cpu")
# FSDP's DTensor shards: DTensor implements the fused Adam/AdamW ops; on the CPU they stay on
# foreach (the fused CPU kernel on DTensor shards aborted a test worker once in two full runs).
FUSED_SHARDED_DEVICES = ("cuda",)


def implementation(groups: List[Dict[str, Any]], optimizer: str, precision: str = "fp32") -> Dict[str, bool]:
    """How torch.optim runs the update over the parameters of ``groups``.

    ``fused=True`` (one kernel for all the parameters of a step) for adam/adamw when every
    parameter is a floating-point tensor on a device of ``FUSED_DEVICES``; for FSDP's DTensor
    shards, by their local device, on ``FUSED_SHARDED_DEVICES`` and not under fp16: FSDP's
    ``ShardedGradScaler`` hands the optimizer a found-inf flag of shape [1], which the fused step
    subtracts from its 0-d step counters ("output with shape [] doesn't match the broadcast shape
    [1]", seen on an H200 with torch 2.11 and on CPU with 2.14). Else ``foreach=True`` (one
    multi-tensor op per update term, instead of a Python loop over the parameters, torch's CPU
    default). sgd stays on foreach: torch's fused SGD leaves its momentum buffers uninitialised
    when the first step is skipped by an fp16 scaler's found-inf flag (NaN weights after it), and
    fails when a parameter gets its first gradient after the others (unused parameters, a late
    head), and sparse gradients. DeepSpeed later swaps in its own flat partitions (plain tensors),
    on the same device.
    """
    params = [p for g in groups for p in g["params"]]
    if optimizer not in ("adam", "adamw") or not params or not all(
            p.device.type in FUSED_DEVICES and torch.is_floating_point(p) for p in params):
        return {"foreach": True}
    if any(isinstance(p, DTensor) for p in params) and (
            precision == "fp16" or not all(p.device.type in FUSED_SHARDED_DEVICES for p in params)):
        return {"foreach": True}
    return {"fused": True}


def make_optimizer_factory(cfg) -> Callable[[Any], torch.optim.Optimizer]:
    """``make(params) -> optimizer`` for ``train.optimizer`` (adamw, adam, sgd)."""

    def make(params: Any) -> torch.optim.Optimizer:  # (the strategy's module, or its parameters)
        named = named_parameters(params)
        groups = param_groups(named, cfg)
        impl = implementation(groups, cfg.optimizer, cfg.precision)
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                        weight_decay=cfg.weight_decay, **impl)
        elif cfg.optimizer == "adam":  # weight decay as an L2 term in the gradient (torch's Adam)
            optimizer = torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                         **impl)
        elif cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                          **impl)
        else:
            raise ValueError(f"train.optimizer={cfg.optimizer!r} is not one of adamw, adam, sgd")
        names = {id(p): n for n, p in named}
        if all(n is not None for n in names.values()):  # (checkpoints record them: a resume needs the same)
            setattr(optimizer, GROUP_NAMES, [[names[id(p)] for p in g["params"]] for g in groups])
        return optimizer

    return make



def steps_for_epochs(epochs: int, batches_per_epoch: int, grad_accum_steps: int, *, step: int = 0, epoch: int = 0,
                     batches_done: int = 0) -> int:
    """``train.epochs``' optimizer steps in all: ``step`` (those taken: a resume's), then every
    micro-batch left of ``epochs`` passes from ``batches_done`` micro-batches into ``epoch`` (a
    resume may come with another global batch, whose steps count other samples),
    ``grad_accum_steps`` to a step (a last step that would be short is left out); ConfigError when
    that is no step or more than a run may take."""
    from dist_train.config.schema import MAX_STEPS

    steps = step + max((epochs - epoch) * batches_per_epoch - batches_done, 0) // grad_accum_steps
    if not 1 <= steps <= MAX_STEPS:
        raise ConfigError("train.epochs", f"{epochs} epoch(s) of {batches_per_epoch} micro-batch(es) per rank, "
                                          f"{grad_accum_steps} to an optimizer step, make {steps} steps; a run takes "
                                          f"1 to {MAX_STEPS}")
    return steps


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup: ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps."""
    return (step + 1) / warmup_steps


def decay_factor(t: int, cfg) -> float:
    """Multiplier ``t`` steps after the warmup ended, for ``cfg.schedule``."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** (t // cfg.step_size)
    if cfg.schedule == "multistep":
        # bisect_right counts the milestones already reached; a repeated milestone counts twice,
        # as in MultiStepLR.
        return cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), t)
    if cfg.schedule == "exponential":
        return cfg.gamma ** t
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(t / span, 1.0)
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    elif cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"train.schedule={cfg.schedule!r} is not a known schedule")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def lr_factor(step: int, cfg) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return warmup_factor(step, cfg.warmup_steps)
    return decay_factor(max(step - cfg.warmup_steps, 0), cfg)


def make_scheduler_factory(cfg) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    """``make(optimizer) -> LambdaLR`` following :func:`lr_factor` (one factor for every param group)."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        # A plain function, not a callable object: LambdaLR then keeps it out of its state dict,
        # which holds only numbers (loadable with weights_only, whatever the schedule).
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

    return make
