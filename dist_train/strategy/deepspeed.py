"""DeepSpeed ZeRO stage 1/2/3 behind the same loop.

The engine owns backward, clipping, the optimizer step and the LR schedule step, so they go
through it; but the optimizer and the scheduler are ours (built by the same factories as every
other strategy), so the update rule and the schedule are identical. The DeepSpeed config is
generated from our config (see :func:`deepspeed_config`); ``strategy.deepspeed.config`` entries
are merged over it after :func:`check_extra_config` has rejected anything contradicting ours.

Accumulation: the loop calls ``backward`` once per micro-batch and ``step`` once per optimizer
step. ``accumulate(sync)`` tells the engine whether this micro-batch ends the accumulation
(``set_gradient_accumulation_boundary``), so the engine reduces (ZeRO-1) or finalises the
partitioned gradients (ZeRO-2/3) only then, and its single ``step()`` call really steps. The loop
already divides each micro-loss by the accumulation count, so the engine must not divide again.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from dist_train.strategy.base import OptimizerFactory, SchedulerFactory, StepPlan, StepResult, Strategy

# The checkpoint tag inside a native checkpoint directory (the directory itself is the step).
NATIVE_TAG = "engine"

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
    "optimizer": "the optimizer is dist_train's own (train.optimizer, train.lr, train.betas, ...)",
    "scheduler": "the LR schedule is dist_train's own (train.schedule, train.warmup_steps, ...)",
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


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    native_checkpoint = True

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory) -> None:
        if self.plan is None:
            raise RuntimeError("deepspeed: build_strategy(..., plan=StepPlan(...)) is required")
        deepspeed = import_deepspeed()
        # DeepSpeed reads its device from LOCAL_RANK, which only torchrun sets (not SLURM or a
        # plain `python -m dist_train`).
        os.environ.setdefault("LOCAL_RANK", str(self.cluster.local_rank))
        # Reuses the process group we made (gloo on CPU, NCCL on GPU); never starts its own.
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   dist_init_required=False)
        model = model.to(self.device)
        optimizer = make_optimizer(model.parameters())
        scheduler = make_scheduler(optimizer)
        config = deepspeed_config(self.cfg, self.plan, self.precision.precision, self.cluster.world_size)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False)
        self.model = engine
        self.optimizer = ds_optimizer
        self.precision.scaler = None  # under fp16 the engine scales the loss (dynamic loss scale)
        # The engine steps this scheduler (our LambdaLR) at each real optimizer step; the loop
        # reads get_last_lr() from it as from any other strategy.
        self.scheduler = ds_scheduler

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        # Not engine.no_sync(): ZeRO-2/3 forbid it. The boundary flag gives the same effect.
        self.model.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divided by train.grad_accum_steps: no second division by the engine.
        self.model.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        raise NotImplementedError("deepspeed clips inside engine.step() (gradient_clipping = train.grad_clip)")

    def step(self, max_norm: float) -> StepResult:
        """One engine step: clip to train.grad_clip, optimizer step, scheduler step, zero grads."""
        self.model.step()
        norm = self.model.get_global_grad_norm()
        loss_scale = None
        if self.precision.precision == "fp16":
            loss_scale = float(getattr(self.optimizer, "cur_scale", getattr(self.optimizer, "loss_scale", 0.0)))
        return StepResult(grad_norm=float(norm) if norm is not None else float("nan"),
                          skipped=not self.model.was_step_applied(), loss_scale=loss_scale)

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model.module

    # --- checkpoints: DeepSpeed's own format (partitioned optimizer state per rank) -----------

    def state_dict(self) -> dict:
        raise NotImplementedError("deepspeed checkpoints through save_native/load_native (native_checkpoint=True)")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("deepspeed checkpoints through save_native/load_native (native_checkpoint=True)")

    def save_native(self, path: str) -> None:
        """Collective: every rank writes its partition under ``path/engine/``."""
        self.model.save_checkpoint(path, tag=NATIVE_TAG, save_latest=False)

    def load_native(self, path: str) -> None:
        """Collective: weights, optimizer partitions and the LR scheduler state from ``path``."""
        loaded, _ = self.model.load_checkpoint(path, tag=NATIVE_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"deepspeed: no engine checkpoint under {path}/{NATIVE_TAG}")

    def teardown(self) -> None:
        destroy = getattr(getattr(self, "model", None), "destroy", None)
        if callable(destroy):
            destroy()
        # DeepSpeed caches the process groups it derived from ours; ours is destroyed after the
        # job, so forget them (what deepspeed.comm.destroy_process_group does), or a second
        # DeepSpeed job in this process (tests, notebooks) would use dead groups.
        from deepspeed.utils import groups

        release = getattr(groups, "_release_process_group_references", None)
        if callable(release):
            release(None)
