"""Checks that need the registries or the machine, run before any process group starts.

Each failure is a ConfigError naming the key, so every rank exits 2 with the same message
instead of failing deep inside a library (or hanging its peers).
"""
from __future__ import annotations

import importlib.util

import torch

from dist_train.config.schema import ConfigError
from dist_train.env.cluster import ClusterEnv


def preflight(job, cluster: ClusterEnv) -> None:
    from dist_train.data import dataset_names
    from dist_train.data.registry import dataset_task
    from dist_train.models.registry import check_model_compatible, model_names
    from dist_train.strategy import resolve_name, strategy_names

    if job.data.name not in dataset_names():
        raise ConfigError("data.name", f"unknown dataset {job.data.name!r}; registered: {', '.join(dataset_names())}")
    if job.model.name not in model_names():
        raise ConfigError("model.name", f"unknown model {job.model.name!r}; registered: {', '.join(model_names())}")
    try:
        check_model_compatible(job.model.name, dataset_task(job.data.name))
    except ValueError as exc:
        raise ConfigError("model.name", str(exc)) from None

    strategy = resolve_name(job.strategy.name, cluster.world_size)
    if strategy not in strategy_names():
        raise ConfigError("strategy.name", f"{strategy!r} is not available; available: {', '.join(strategy_names())}")
    if strategy == "single" and cluster.world_size > 1:
        raise ConfigError("strategy.name", f"single runs one process, but this job has world size {cluster.world_size}; "
                          "use ddp, fsdp or deepspeed (or auto)")
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("strategy.name", "deepspeed is not installed (pip install 'dist_train[deepspeed]')")
    cuda = torch.cuda.is_available()
    if job.train.precision == "fp16" and not cuda:
        raise ConfigError("train.precision", "fp16 needs a CUDA GPU (no GPU here); use bf16 or fp32 on the CPU")
    if job.train.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision", "this GPU has no bf16 support; use fp16 or fp32")
    if strategy == "fsdp":
        _check_fsdp(job, cuda)
    if strategy == "deepspeed":
        _check_deepspeed(job, cluster, cuda)
    if job.checkpoint.resume not in ("auto", "never"):
        import os

        if not os.path.exists(job.checkpoint.resume):
            raise ConfigError("checkpoint.resume", f"no checkpoint at {job.checkpoint.resume!r} (auto, never or a path)")
    from dist_train.preflight_io import check_io

    check_io(job, cluster)  # run dir writable, data.root present, resume path a checkpoint, sane worker count


def _check_fsdp(job, cuda: bool) -> None:
    fsdp, precision = job.strategy.fsdp, job.train.precision
    if fsdp.cpu_offload and not cuda:
        raise ConfigError("strategy.fsdp.cpu_offload", "CPU offload moves sharded state out of GPU memory, and this "
                          "machine has no GPU: the parameters already live in host memory; set it to false")
    allowed = ("fp32",) if precision == "fp32" else ("fp32", precision)
    if fsdp.reduce_dtype not in allowed:
        raise ConfigError("strategy.fsdp.reduce_dtype", f"{fsdp.reduce_dtype} under train.precision={precision}: "
                          f"gradients are reduced in fp32 or in the compute dtype ({' or '.join(allowed)})")


def _check_deepspeed(job, cluster: ClusterEnv, cuda: bool) -> None:
    """Our settings must be expressible as a DeepSpeed config, and extra entries must not contradict them."""
    from dist_train.strategy.base import StepPlan
    from dist_train.strategy.deepspeed import check_extra_config, deepspeed_config

    scfg = job.strategy
    plan = StepPlan(job.data.batch_size, job.train.grad_accum_steps, job.train.grad_clip)
    bad = check_extra_config(scfg, plan, job.train.precision, cluster.world_size)
    if bad:
        raise ConfigError(*bad)
    zero = deepspeed_config(scfg, plan, job.train.precision, cluster.world_size)["zero_optimization"]
    for what in ("offload_optimizer", "offload_param"):
        device = (zero.get(what) or {}).get("device", "none") if isinstance(zero.get(what), dict) else "none"
        if device != "none" and not cuda:
            key = (f"strategy.deepspeed.{what}" if getattr(scfg.deepspeed, what)
                   else f"strategy.deepspeed.config.zero_optimization.{what}")
            raise ConfigError(key, "DeepSpeed offload moves state out of GPU memory, and this machine has no GPU "
                              "(DeepSpeed's CPU backend keeps everything in host memory already); set it to false")
    if scfg.deepspeed.config:
        _validate_with_deepspeed(scfg, plan, job.train.precision)


def _validate_with_deepspeed(scfg, plan, precision: str) -> None:
    """DeepSpeed's own schema (pydantic, extra keys forbidden) on each extra entry, one at a time,
    so the error names the entry. World size 1 here: the batch arithmetic was checked above."""
    import logging

    from dist_train.strategy.deepspeed import generated_config, import_deepspeed, merge_config

    import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    base = generated_config(scfg, plan, precision, world_size=1)
    quiet = logging.getLogger("DeepSpeed")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for key, value in scfg.deepspeed.config.items():
            try:
                DeepSpeedConfig(merge_config(base, {key: value}))
            except Exception as exc:  # pydantic ValidationError, AssertionError, ValueError ...
                where, reason = _pydantic_error(exc)
                raise ConfigError(f"strategy.deepspeed.config.{key}{where}", f"DeepSpeed rejects it: {reason}") from None
    finally:
        quiet.setLevel(level)


def _pydantic_error(exc: Exception) -> tuple:
    """(".sub.key", message) of the first error of a pydantic ValidationError, else ("", text)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            return "".join(f".{part}" for part in first.get("loc", ())), str(first.get("msg", exc))
        except Exception:
            pass
    return "", (str(exc).strip().splitlines() or [type(exc).__name__])[0]
