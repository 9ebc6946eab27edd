"""DeepSpeed's config, generated from ours, and the checks that keep the two consistent.

The DeepSpeed config is generated from our settings (see :func:`deepspeed_config`);
``strategy.deepspeed.config`` entries are merged over it after :func:`check_extra_config` has
rejected anything contradicting ours, and :func:`check_config` (called by preflight through the
strategy) adds DeepSpeed's own schema on top, before any process group starts.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import os
import warnings
from typing import Any, Dict, Optional

import torch

from dist_train.config.schema import ConfigError
from dist_train.strategy.base import StepPlan

# Top-level DeepSpeed config keys we pass through (a typo of any key is rejected, not ignored).
KNOWN_KEYS = frozenset("""
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps steps_per_print
    wall_clock_breakdown dump_state memory_breakdown gradient_clipping prescale_gradients
    gradient_predivide_factor gradient_allreduce_op sparse_gradients communication_data_type
    seq_parallel_communication_data_type fp16 bf16 bfloat16 amp torch_autocast zero_optimization
    zero_allow_untested_optimizer zero_force_ds_cpu_optimizer activation_checkpointing
    flops_profiler tensorboard wandb csv_monitor comet comms_logger aio checkpoint data_types
    elasticity autotuning compression_training data_efficiency curriculum_learning timers
    disable_allgather dataloader_drop_last disable_python_gc compile hybrid_engine
    weight_quantization pipeline expert_parallel use_data_before_expert_parallelism
    vocabulary_size nebula eigenvalue progressive_layer_drop quantize_training sparse_attention
    graph_harvesting use_node_local_storage log_level optimizer scheduler managed_gradient_accumulation
""".split())

# Keys whose value our config decides: (key, the dist_train setting that owns it).
OWNED = {
    "train_batch_size": "data.batch_size x train.grad_accum_steps x world size",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
}
REFUSED = {
    "optimizer": "the optimizer is built by dist_train (train.optimizer, train.lr, train.betas, ...; or fit(optimizer=...))",
    "scheduler": "the LR schedule is built by dist_train (train.schedule, train.warmup_steps, ...; or fit(scheduler=...))",
    "managed_gradient_accumulation": "dist_train drives accumulation through the engine's boundary flag",
    "amp": "precision is train.precision",
    "torch_autocast": "precision is train.precision (dist_train applies autocast itself)",
}


def merge_config(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def generated_config(cfg, plan: StepPlan, precision: str, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config our settings imply (``cfg`` is the ``strategy`` section)."""
    zero: Dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "train_batch_size": plan.micro_batch_size * plan.grad_accum_steps * world_size,
        "gradient_clipping": plan.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling (loss_scale 0), as torch's GradScaler does for the other strategies.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},
        "zero_optimization": zero,
        # Our torch optimizer is not on DeepSpeed's tested list, and with offload it runs on the
        # host copy of the state (DeepSpeedCPUAdam would be faster but is a different optimizer).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,  # our loop logs; keep the engine quiet
        "wall_clock_breakdown": False,
    }


def deepspeed_config(cfg, plan: StepPlan, precision: str, world_size: int) -> Dict[str, Any]:
    """The generated config with ``strategy.deepspeed.config`` merged over it."""
    return merge_config(generated_config(cfg, plan, precision, world_size), dict(cfg.deepspeed.config or {}))


def engine_drops_nonfinite(config: Dict[str, Any]) -> bool:
    """Whether the engine refuses an update whose global gradient norm is not finite, the same on
    every rank (DeepSpeed 0.19: ZeRO 1-3 under fp16, its loss scaler's overflow check; under bf16
    unless ``bf16.check_grad_overflow`` is false; under fp32 through the global norm it computes,
    unless ``zero_optimization.compute_grad_norm`` is false: then a NaN gradient was applied).
    Then the loop needs no loss veto of its own."""
    bf16 = config.get("bf16") or config.get("bfloat16") or {}
    if isinstance(bf16, dict) and bf16.get("enabled"):
        return bool(bf16.get("check_grad_overflow", True))
    fp16 = config.get("fp16") or {}
    if isinstance(fp16, dict) and fp16.get("enabled"):
        return True
    zero = config.get("zero_optimization") or {}
    return not isinstance(zero, dict) or bool(zero.get("compute_grad_norm", True))


def check_extra_config(cfg, plan: StepPlan, precision: str, world_size: int) -> Optional[tuple]:
    """``(key, reason)`` for the first entry of ``strategy.deepspeed.config`` that is unknown or
    contradicts our config, else None. Pure: no deepspeed import (preflight adds DeepSpeed's own
    schema check on top)."""
    extra = dict(cfg.deepspeed.config or {})
    ours = generated_config(cfg, plan, precision, world_size)
    prefix = "strategy.deepspeed.config."
    for key, value in extra.items():
        if key not in KNOWN_KEYS:
            return prefix + key, "not a DeepSpeed config key (typo?)"
        if key in REFUSED:
            return prefix + key, f"not settable here: {REFUSED[key]}"
        if isinstance(ours.get(key), (bool, int, float)) and not isinstance(ours[key], bool) \
                and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return prefix + key, f"must be a number; got {value!r}"
        if key in OWNED and value != ours[key]:
            return prefix + key, f"{value!r} contradicts {OWNED[key]} (= {ours[key]!r}); set it there instead"
        if key in ("fp16", "bf16", "bfloat16") and isinstance(value, dict) and "enabled" in value:
            wanted = precision == {"bfloat16": "bf16"}.get(key, key)
            if bool(value["enabled"]) != wanted:
                return prefix + key + ".enabled", f"contradicts train.precision={precision}; set train.precision instead"
        if key == "zero_optimization":
            if not isinstance(value, dict):
                return prefix + key, "must be a mapping"
            if "stage" in value and value["stage"] != cfg.zero_stage:
                return prefix + key + ".stage", (f"{value['stage']!r} contradicts strategy.zero_stage={cfg.zero_stage}; "
                                                 "choose the stage with strategy.zero_stage (1, 2 or 3)")
    return None


def import_deepspeed():
    """Import deepspeed quietly; on a machine without CUDA, on its CPU accelerator."""
    if not torch.cuda.is_available():
        # Must be set before the import: DeepSpeed picks its accelerator once, at import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not logging.getLogger("dist_train").isEnabledFor(logging.DEBUG):
        deepspeed.utils.logger.setLevel(logging.WARNING)
    # DeepSpeed calls torch collectives by their deprecated names; say so once, not every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger",
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    if not torch.cuda.is_available():
        # The CPU backend JIT-compiles a shared-memory all-reduce (a C++ build, tens of seconds on
        # a small machine) used only by DeepSpeed's inference all-reduce; training collectives
        # run on our gloo group. Mark it unavailable so it is never built.
        try:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        except Exception:  # another DeepSpeed version without this table: it just gets built
            pass
    return deepspeed


def check_config(scfg, plan: StepPlan, precision: str, world_size: int) -> None:
    """Our settings must be expressible as a DeepSpeed config, and extra entries must not contradict them."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("strategy.name", "deepspeed is not installed (pip install 'dist_train[deepspeed]')")
    if scfg.deepspeed.offload_param and scfg.zero_stage != 3:
        raise ConfigError("strategy.deepspeed.offload_param", f"parameter offload needs ZeRO stage 3 (only stage 3 "
                          f"partitions parameters); strategy.zero_stage is {scfg.zero_stage}")
    cuda = torch.cuda.is_available()
    bad = check_extra_config(scfg, plan, precision, world_size)
    if bad:
        raise ConfigError(*bad)
    zero = deepspeed_config(scfg, plan, precision, world_size)["zero_optimization"]
    for what in ("offload_optimizer", "offload_param"):
        device = (zero.get(what) or {}).get("device", "none") if isinstance(zero.get(what), dict) else "none"
        if device != "none" and not cuda:
            key = (f"strategy.deepspeed.{what}" if getattr(scfg.deepspeed, what)
                   else f"strategy.deepspeed.config.zero_optimization.{what}")
            raise ConfigError(key, "DeepSpeed offload moves state out of GPU memory, and this machine has no GPU "
                              "(DeepSpeed's CPU backend keeps everything in host memory already); set it to false")
    if scfg.deepspeed.config:
        _validate_with_deepspeed(scfg, plan, precision)


def _validate_with_deepspeed(scfg, plan, precision: str) -> None:
    """DeepSpeed's own schema (pydantic, extra keys forbidden) on each extra entry, one at a time,
    so the error names the entry. World size 1 here: the batch arithmetic was checked above."""
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
