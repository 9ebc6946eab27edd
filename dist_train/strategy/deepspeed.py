"""DeepSpeed ZeRO stage 1/2/3 behind the same loop.

The engine owns backward, clipping, the optimizer step and the LR schedule step, so they go
through it; but the optimizer and the scheduler are ours (built by the same factories as every
other strategy), so the update rule and the schedule are identical. The DeepSpeed config is
generated from ours (``deepspeed_config.py``).

Accumulation: the loop calls ``backward`` once per micro-batch and ``step`` once per optimizer
step. ``accumulate(sync)`` tells the engine whether this micro-batch ends the accumulation
(``set_gradient_accumulation_boundary``), so the engine reduces (ZeRO-1) or finalises the
partitioned gradients (ZeRO-2/3) only then, and its single ``step()`` call really steps. The loop
already divides each micro-loss by the accumulation count, so the engine must not divide again.

Checkpoints: the engine's own files (partitioned optimizer state per rank) under ``native/``, plus
the full fp32 model weights in the DCP layout every other strategy reads (``deepspeed_state.py``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from types import MethodType, SimpleNamespace
from typing import Any, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from dist_train.strategy import compiling
from dist_train.strategy import deepspeed_config as ds_config
from dist_train.strategy import deepspeed_state
from dist_train.strategy.base import (OptimizerFactory, SchedulerFactory, StepPlan, StepResult, Strategy, Writer,
                                      load_scheduler_state, scheduler_state)

log = logging.getLogger("dist_train")

# The checkpoint tag inside a native checkpoint directory (the directory itself is the step).
NATIVE_TAG = "engine"


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    checkpoint_kind = "native"
    # The engine writes its files with collectives on the default group: never off the main thread.
    async_checkpoint = False
    # The engine assembles the global norm inside its step and drops the update when it is not
    # finite (ZeRO 1-3 at every precision, unless bf16.check_grad_overflow=false): then no loss
    # veto (an all-reduce and a host sync per step) is needed. setup() decides from the config.
    global_grad_norm = True

    @classmethod
    def check_config(cls, cfg, plan: StepPlan, precision: str, world_size: int) -> None:
        ds_config.check_config(cfg, plan, precision, world_size)

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory) -> None:
        if self.plan is None:
            raise RuntimeError("deepspeed: build_strategy(..., plan=StepPlan(...)) is required")
        deepspeed = ds_config.import_deepspeed()
        # DeepSpeed requires LOCAL_RANK, which only torchrun sets (not SLURM or a plain
        # `python -m dist_train`); its device is set below.
        # On a GPU it is the index of this rank's device: ZeRO-3's zero.Init and its utilities put
        # tensors on cuda:LOCAL_RANK, and under SLURM's --gpus-per-task=1 task 3 of a node sees only
        # cuda:0 ("invalid device ordinal").
        # Put back at teardown: fit runs in the user's process, whose environment is theirs.
        self._local_rank_before = os.environ.get("LOCAL_RANK")
        if self.device.type == "cuda":
            os.environ["LOCAL_RANK"] = str(self.device.index or 0)
        else:
            os.environ.setdefault("LOCAL_RANK", str(self.cluster.local_rank))
        # Reuses the process group we made (gloo on CPU, NCCL on GPU); never starts its own.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend() if torch.distributed.is_initialized()
                                   else ("nccl" if self.device.type == "cuda" else "gloo"), dist_init_required=False)
        model = model.to(self.device)
        # Under bf16/fp16 the engine keeps the module's parameters in that dtype, and fp32 master
        # copies only of those its optimizer holds: frozen ones would be known only rounded. Their
        # fp32 values are kept here (they never change), for checkpoints and fit's hand-back.
        self._frozen_fp32: Dict[str, torch.Tensor] = {}
        statistics: List[Tuple[nn.Module, str, torch.Tensor]] = []
        if self.precision.precision != "fp32":
            # (Only fp32 ones: a frozen bf16 weight loses nothing to the engine's cast. A host copy
            # on every rank: under ZeRO-3 too, where the module holds a partition.)
            self._frozen_fp32 = {name: v.detach().to("cpu", torch.float32, copy=True)
                                 for name, v in model.state_dict(keep_vars=True).items()
                                 if isinstance(v, nn.Parameter) and not v.requires_grad and v.dtype == torch.float32}
            statistics = _norm_statistics_in(model, self.precision.dtype)
        optimizer = make_optimizer(model)
        scheduler = make_scheduler(optimizer)
        config = ds_config.deepspeed_config(self.cfg, self.plan, self.precision.precision, self.cluster.world_size)
        self.global_grad_norm = ds_config.engine_drops_nonfinite(config)
        # The engine's device is cuda:LOCAL_RANK unless told: under SLURM with one visible GPU per
        # task (--gpus-per-task=1) the local rank is 0-7 and the only device is cuda:0.
        args = SimpleNamespace(device_rank=self.device.index) if self.device.type == "cuda" else None
        # (Per epoch, the loop steps the schedule: the engine, which would step it per step, never sees it.)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler if self.scheduler_per_step else None,
            config=config, dist_init_required=False)
        if self.precision.precision != "fp32" and "buffer_dtype" not in (config.get("data_types") or {}):
            _keep_fp32(statistics)  # (older DeepSpeed releases cast every buffer with the parameters)
        if compiling.wanted(self):
            if self.cfg.zero_stage == 3 and self.cluster.is_rank0:
                log.warning("train.compile under ZeRO stage 3: TorchDynamo traces DeepSpeed's parameter hooks at "
                            "every module and recompiles them (slow first steps, recompile_limit warnings); "
                            "DeepSpeed's DeepCompile (strategy.deepspeed.config.compile.deepcompile=true, GPU) "
                            "is its own path for stage 3")
            engine.compile()  # compiles engine.module in place: parameter names unchanged
        if self.precision.precision != "fp32":
            _cast_at_the_edges(engine.module, self.precision.dtype)
        self.model = engine
        self.optimizer = ds_optimizer
        self.precision.scaler = None  # under fp16 the engine scales the loss (dynamic loss scale)
        # The engine steps this scheduler (our LambdaLR) at each real optimizer step; the loop
        # reads the learning rate from it as from any other strategy.
        self.scheduler = ds_scheduler if self.scheduler_per_step else scheduler

    def autocast(self) -> ContextManager:
        """No torch.autocast: the engine's bf16/fp16 section owns mixed precision. It keeps the
        module's parameters in that dtype (the fp32 master copy in its optimizer) and, on a GPU,
        turns an outer autocast off inside its forward (``deepspeed.runtime.torch_autocast``; on a
        CPU it does not see one): fp32 inputs then met bf16 weights and the first layer failed.
        The module instead computes in the engine's dtype on every device, its floating-point
        inputs cast to that dtype and its outputs to fp32 (``_cast_at_the_edges``), so the task's
        loss and metrics are taken in fp32, as autocast takes a loss."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        # Not engine.no_sync(): ZeRO-2/3 forbid it. The boundary flag gives the same effect.
        self.model.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divided by train.grad_accum_steps: no second division by the engine.
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self, max_norm: float, apply: bool = True, grad_norms: int = 0, finite_grads: bool = False) -> StepResult:
        """One engine step: clip to train.grad_clip (the engine's ``gradient_clipping``), optimizer
        step, scheduler step, zero grads. A vetoed step drops the reduced gradients and advances
        only the schedule. The engine itself drops an update whose global gradient norm is not
        finite (``global_grad_norm``): outside fp16, where that is the loss scaler's overflow
        skip, such a step is reported non-finite. The schedule advances for every dropped update
        (an fp16 overflow skip too), as under the other strategies."""
        per_module = self.module_grad_norms(grad_norms) if grad_norms else None
        if not apply:
            self.model.zero_grad()
            self.optimizer.zero_grad()
            if self.scheduler_per_step:
                self.scheduler.step()
            return StepResult(grad_norm=torch.tensor(float("nan")), skipped=True, grad_norms=per_module, nonfinite=True)
        self.model.step()
        norm = self.model.get_global_grad_norm()
        loss_scale, nonfinite = None, False
        applied = self.model.was_step_applied()
        if self.precision.precision == "fp16":
            loss_scale = float(getattr(self.optimizer, "cur_scale", getattr(self.optimizer, "loss_scale", 0.0)))
        elif not applied:  # the engine found the global norm not finite (the same on every rank)
            nonfinite = True
        if not applied and self.scheduler_per_step:
            # The engine steps the schedule only for applied updates; every strategy's LR is a
            # function of the step, a loss scaler's overflow skip included (as GradScaler's).
            self.scheduler.step()
        if norm is None:
            norm = torch.tensor(float("nan"))
        elif not isinstance(norm, torch.Tensor):
            norm = torch.tensor(float(norm))
        return StepResult(grad_norm=norm, skipped=not applied, loss_scale=loss_scale, grad_norms=per_module,
                          nonfinite=nonfinite)

    def _named_grads(self):
        # The engine keeps reduced gradients in its (partitioned) optimizer: assemble each one.
        # Collective under ZeRO: every rank walks the parameters in the same order.
        from deepspeed.utils import safe_get_full_grad

        for name, p in self.unwrapped_model.named_parameters():
            if p.requires_grad:
                grad = safe_get_full_grad(p)
                if grad is not None:
                    yield name, grad

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model.module

    @property
    def shards_module(self) -> bool:
        """The engine changes the module it is given when ZeRO-3 partitions its parameters or
        bf16/fp16 cast them in place (and hooks stay on it): then fit's instance is not handed
        over, a copy is. Under fp32 ZeRO-1/2 the instance trains in place, as under DDP."""
        return self.cfg.zero_stage == 3 or self.precision.precision != "fp32"

    def full_state(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Collective: the fp32 values (the optimizer's master copies; frozen parameters as they
        were given), not the module's bf16/fp16 ones."""
        yield from deepspeed_state.full_weights(self.unwrapped_model, self._frozen_fp32).items()

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, files, stage: bool) -> Tuple[Dict[str, Any], Writer]:
        def write() -> None:
            # Collective: every rank writes its partition under native/engine/, then the full
            # fp32 weights (assembled collectively) go where the other strategies read them.
            self.model.save_checkpoint(files.native_dir, tag=NATIVE_TAG, save_latest=False)
            files.write_state({"model": deepspeed_state.full_weights(self.unwrapped_model, self._frozen_fp32)})

        return {"scheduler": scheduler_state(self.scheduler), "scaler": None, "param_groups": self.param_group_names()}, write

    def _own_format(self, meta: Dict[str, Any]) -> bool:
        return meta.get("kind") == self.checkpoint_kind and meta.get("strategy") == self.name

    def check_checkpoint(self, files, meta: Dict[str, Any], load_optimizer: bool) -> Optional[str]:
        from dist_train.strategy.dcp_state import foreign_optimizer_reason, shape_mismatches

        problem = shape_mismatches(files.stored_shapes(), self.model_shapes())
        if problem:
            return f"it does not fit this model: {problem}"
        if not load_optimizer:
            return None
        if not self._own_format(meta):
            return foreign_optimizer_reason(meta, self.name)
        stored = (meta.get("config") or {}).get("strategy", {}).get("zero_stage")
        if stored is not None and (stored == 3) != (self.cfg.zero_stage == 3):
            return (f"it holds ZeRO-{stored} optimizer partitions and this run uses strategy.zero_stage="
                    f"{self.cfg.zero_stage}: DeepSpeed loads ZeRO-3's partitions only into ZeRO-3, and ZeRO-1/2's only "
                    f"into ZeRO-1/2. Resume with strategy.zero_stage={stored}, or set checkpoint.load_optimizer=false "
                    f"to continue from its full model weights with a fresh optimizer state")
        if meta.get("world_size") != self.cluster.world_size:
            return (f"it holds deepspeed optimizer partitions for world size {meta.get('world_size')}, and deepspeed "
                    f"cannot re-partition them for world size {self.cluster.world_size}. Resume at world size "
                    f"{meta.get('world_size')}, or set checkpoint.load_optimizer=false to continue from its full "
                    f"model weights with a fresh optimizer state")
        return None

    def load_checkpoint(self, files, meta: Dict[str, Any], load_optimizer: bool) -> None:
        if load_optimizer:  # weights, optimizer partitions and the LR scheduler, from the engine's files
            with deepspeed_state.safe_engine_loads(self.model):
                loaded, _ = self.model.load_checkpoint(files.native_dir, tag=NATIVE_TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
            if loaded is None:
                raise RuntimeError(f"deepspeed: no engine checkpoint under {files.native_dir}/{NATIVE_TAG}")
            if not self.scheduler_per_step:  # (the engine was not given it: train.scheduler_interval=epoch)
                load_scheduler_state(self.scheduler, meta["scheduler"])
            if self._frozen_fp32:  # (the engine's files hold them rounded; the checkpoint's fp32 weights exactly)
                self._keep_frozen(files.read_model())
            return
        weights = files.read_model()
        deepspeed_state.set_full_weights(self.unwrapped_model, weights)
        self._keep_frozen(weights)
        self._load_small_state(meta, fresh_optimizer=True)

    def _keep_frozen(self, weights: Dict[str, torch.Tensor]) -> None:
        for name in self._frozen_fp32:
            if name in weights:
                self._frozen_fp32[name] = weights[name].detach().to("cpu", torch.float32, copy=True)

    def model_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return deepspeed_state.model_shapes(self.unwrapped_model)

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
        if hasattr(self, "_local_rank_before"):  # (setup ran)
            if self._local_rank_before is None:
                os.environ.pop("LOCAL_RANK", None)
            else:
                os.environ["LOCAL_RANK"] = self._local_rank_before


def _cast_floats(value: Any, dtype: torch.dtype, only: Tuple[torch.dtype, ...] = ()) -> Any:
    """``value`` with every floating-point tensor in it (nested in tuples, lists and dicts) cast to
    ``dtype``; with ``only``, just the tensors of those dtypes."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != dtype and (not only or value.dtype in only):
            return value.to(dtype)
        return value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_cast_floats(v, dtype, only) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype, only) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _cast_floats(v, dtype, only)) for k, v in value.items())
    return value


def _cast_at_the_edges(module: nn.Module, dtype: torch.dtype) -> None:
    """Hooks on the engine's module under bf16/fp16: floating-point inputs in ``dtype`` (the
    parameters' dtype; token ids and masks of other dtypes untouched, as DeepSpeed's own
    ``fp16.auto_cast`` does), outputs in ``dtype`` back to fp32 for the task's loss."""

    def inputs(_module, args, kwargs):
        return _cast_floats(args, dtype), _cast_floats(kwargs, dtype)

    def outputs(_module, _args, output):
        return _cast_floats(output, torch.float32, only=(dtype,))

    module.register_forward_pre_hook(inputs, with_kwargs=True)
    module.register_forward_hook(outputs)


def _norm_statistics_in(model: nn.Module, dtype: torch.dtype) -> List[Tuple[nn.Module, str, torch.Tensor]]:
    """BatchNorm under the engine's bf16/fp16 section, which casts every parameter (BatchNorm's affine
    too), where batch_norm refuses half-precision weights with fp32 statistics. The running
    statistics stay fp32, as under autocast and FSDP's fp32 unit (accumulated in bf16 a momentum
    update kept 3 significant digits, and a pretrained model's statistics were rounded): the forward
    normalises the half-precision input with the affine weights read as fp32, the mix batch_norm
    takes on CPU and CUDA (its output in the input's dtype). A subclass with a forward of its own
    (SyncBatchNorm) keeps its statistics in ``dtype`` instead. Returns (module, buffer name, its
    fp32 values) of the statistics kept fp32, for ``_keep_fp32``."""
    kept: List[Tuple[nn.Module, str, torch.Tensor]] = []
    for bn in model.modules():
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        names = [n for n in ("running_mean", "running_var") if getattr(bn, n, None) is not None]
        if type(bn).forward is nn.modules.batchnorm._BatchNorm.forward:
            bn.forward = MethodType(_batch_norm_fp32_forward, bn)
            kept.extend((bn, n, getattr(bn, n).detach().clone()) for n in names
                        if getattr(bn, n).dtype == torch.float32)
            continue
        for n in names:
            getattr(bn, n).data = getattr(bn, n).data.to(dtype)
    return kept


def _keep_fp32(kept: List[Tuple[nn.Module, str, torch.Tensor]]) -> None:
    """Put back the fp32 values of statistics that the engine cast to its dtype: DeepSpeed releases
    older than its ``data_types.buffer_dtype`` cast every buffer with the parameters. A
    ``buffer_dtype`` of the user's own is left as given: the forward then reads the weights in the
    statistics' dtype."""
    for bn, name, fp32 in kept:
        buffer = getattr(bn, name)
        if buffer.dtype != torch.float32:
            buffer.data = fp32.to(buffer.device)


def _batch_norm_fp32_forward(self: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """``_BatchNorm.forward`` with the affine weights read in the statistics' dtype: fp32 (the engine
    holds the weights in bf16/fp16), or the engine's dtype where it cast the statistics too."""
    self._check_input_dim(input)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    running = not self.training or self.track_running_stats
    dtype = torch.float32 if self.running_mean is None else self.running_mean.dtype
    return F.batch_norm(input, self.running_mean if running else None, self.running_var if running else None,
                        None if self.weight is None else self.weight.to(dtype),
                        None if self.bias is None else self.bias.to(dtype), batch_stats, factor, self.eps)
