"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state
sharded across ranks.

Each of the model's ``block_classes`` becomes one FSDP unit (its parameters are all-gathered just
for its forward and backward), then the root takes what is left (embeddings, head). Parameters
are DTensors sharded on dim 0; the optimizer is built over them, so its state is sharded too.

Mixed precision is FSDP's own: under bf16/fp16 the gathered parameters are cast to the compute
dtype and gradients are reduced in ``strategy.fsdp.reduce_dtype``; the sharded fp32 parameters
are what the optimizer updates. No autocast on top (as in torchtitan).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable, ContextManager, Iterator, Optional, Tuple, TypeVar

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

from dist_train.config.schema import ConfigError
from dist_train.strategy import compiling
from dist_train.strategy.base import DTYPES, OptimizerFactory, SchedulerFactory, StepPlan, Strategy

log = logging.getLogger("dist_train")

# In-place random fills (what torch.nn.init and reset_parameters() use). Their values depend on
# the element's position in the FULL tensor, so a shard cannot draw its own part: see _FullInit.
_RANDOM_FILLS = {
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.exponential_,
    torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.random_,
}


def _is_fill(func) -> bool:
    # torch.nn.init functions (kaiming_uniform_, trunc_normal_, ...) reach a mode as themselves,
    # before the Tensor methods they call; none of them reads the tensor's old values.
    return func in _RANDOM_FILLS or getattr(func, "__module__", None) == "torch.nn.init"


class _FullInit(TorchFunctionMode):
    """Makes ``init_weights()`` on sharded (or device) parameters give exactly the values it gives
    on a whole model on the CPU.

    Each fill of a DTensor (a random Tensor method or a ``torch.nn.init`` function) is done on a
    full-size CPU tensor, drawing from torch's default CPU generator exactly what a
    single-process build draws, in the same order; then this rank's shard of it is copied in.
    Only one full parameter exists at a time. Other in-place ops (zero_, fill_, mul_ ...) run on
    the shards directly: elementwise, they need nothing else.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        # torch.nn.init functions hand their tensor over as the keyword `tensor`.
        target = args[0] if args else kwargs.get("tensor")
        if _is_fill(func) and isinstance(target, torch.Tensor) and (
                isinstance(target, DTensor) or target.device.type != "cpu"):
            full = torch.empty(target.shape, dtype=target.dtype, device="cpu")
            if args:
                args = (full, *args[1:])
            else:
                kwargs["tensor"] = full
            func(*args, **kwargs)  # the mode is off inside its own handler: plain CPU draws
            with torch.no_grad():
                if isinstance(target, DTensor):
                    # src_data_rank=None: every rank drew the same full tensor, so no communication.
                    local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                    target.to_local().copy_(local.to_local())
                else:
                    target.copy_(full)
            return target
        return func(*args, **kwargs)


def block_classes(model: nn.Module) -> tuple:
    """The classes FSDP wraps one unit each: the model's ``block_classes`` when it declares them
    (dist_train's models do), else its repeated blocks: module classes that occur at least twice
    as elements of an ``nn.Sequential``/``nn.ModuleList`` and hold parameters of their own children
    (torchvision's BasicBlock, Bottleneck, InvertedResidual, EncoderBlock; a user's layers).
    ``block_classes = ()`` on the model: no units but the root."""
    declared = getattr(model, "block_classes", None)
    if declared is not None:  # (an empty tuple: no units but the root)
        return tuple(declared)
    counts: dict = {}
    for container in model.modules():
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            for child in container.children():
                if len(list(child.children())) > 0 and any(True for _ in child.parameters()):
                    counts[type(child)] = counts.get(type(child), 0) + 1
    repeated = [cls for cls, n in counts.items() if n >= 2 and cls not in (nn.Sequential, nn.ModuleList)]
    return tuple(repeated)


def outermost(model: nn.Module, classes: tuple) -> Tuple[list, list]:
    """Instances of ``classes`` in ``model`` that are not inside another such instance, in module
    order (one FSDP unit each; a nested match stays part of its outer unit). A block that shares a
    parameter with any module outside it (a weight tied across layers, an embedding tied to the
    head) is left to the root's unit: a parameter belongs to one FSDP unit, and the other user
    would meet it sharded. Returns (the units, the blocks left to the root)."""
    found, inside = [], set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if classes and isinstance(module, classes):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    if not found:
        return found, []
    owners: dict = {}  # id(parameter) -> ids of the modules that hold it directly
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(module))
    kept, left = [], []
    for block in found:
        mine = {id(m) for m in block.modules()}
        (kept if all(owners[id(p)] <= mine for p in block.parameters()) else left).append(block)
    return kept, left


T = TypeVar("T")


def _call_with(model: nn.Module) -> Callable[[Callable[[nn.Module], T]], T]:
    """The root's "forward method" for run_task: ``fn(model)``."""
    def call(fn: Callable[[nn.Module], T]) -> T:
        return fn(model)
    return call


def _root_reshard(configured: bool) -> Optional[bool]:
    """``reshard_after_forward`` for the root: FSDP's own choice (``None``: the root keeps its
    parameters gathered until the backward) unless the config says to keep every unit's; a torch
    whose ``fully_shard`` has no ``None`` (2.6) keeps the root's gathered itself."""
    if not configured:
        return False
    default = inspect.signature(fully_shard).parameters["reshard_after_forward"].default
    return None if default is None else configured


class FSDPStrategy(Strategy):
    name = "fsdp"

    @classmethod
    def check_config(cls, cfg, plan: StepPlan, precision: str, world_size: int) -> None:
        fsdp = cfg.fsdp
        if fsdp.cpu_offload and not torch.cuda.is_available():
            raise ConfigError("strategy.fsdp.cpu_offload", "CPU offload moves sharded state out of GPU memory, and "
                              "this machine has no GPU: the parameters already live in host memory; set it to false")
        allowed = ("fp32",) if precision == "fp32" else ("fp32", precision)
        if fsdp.reduce_dtype not in allowed:
            raise ConfigError("strategy.fsdp.reduce_dtype", f"{fsdp.reduce_dtype} under train.precision={precision}: "
                              f"gradients are reduced in fp32 or in the compute dtype ({' or '.join(allowed)})")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_rng: Optional[torch.Tensor] = None
        if self.precision.scaler is not None:
            # Each rank sees only its gradient shards: the inf/nan check must be all-reduced,
            # or ranks would disagree on skipping a step (fp16 is GPU-only).
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.precision.scaler = ShardedGradScaler(self.device.type)

    def init_context(self) -> ContextManager:
        return self._on_meta() if self.cfg.fsdp.meta_init else contextlib.nullcontext()

    @contextlib.contextmanager
    def _on_meta(self) -> Iterator[None]:
        # The generator state a plain build would start from: _materialise replays it.
        self._init_rng = torch.get_rng_state()
        with torch.device("meta"):
            yield

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory) -> None:
        fcfg = self.cfg.fsdp
        mesh = init_device_mesh(self.device.type, (self.cluster.world_size,))
        mp = MixedPrecisionPolicy()
        if self.precision.precision != "fp32":
            mp = MixedPrecisionPolicy(param_dtype=self.precision.dtype, reduce_dtype=DTYPES[fcfg.reduce_dtype])
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if fcfg.cpu_offload else OffloadPolicy()
        shard = dict(mesh=mesh, reshard_after_forward=fcfg.reshard_after_forward, mp_policy=mp, offload_policy=offload)
        if self.precision.precision != "fp32":
            # BatchNorm in a unit of its own with fp32 parameters, as under autocast: in a bf16/fp16
            # unit its weights were cast while its running statistics stayed fp32, and batch_norm
            # refuses that mix. It takes the half-precision activations as they are (a supported mix:
            # fp32 statistics and affine, output in the input's dtype).
            norm = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
            for bn in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
                fully_shard(bn, **dict(shard, mp_policy=norm))
        blocks, left = outermost(model, block_classes(model))
        if left and self.cluster.is_rank0:
            names = {id(m): n for n, m in model.named_modules()}
            log.info("fsdp: %s share parameters with modules outside them (tied weights): left to the root's "
                     "unit", ", ".join(names.get(id(m), type(m).__name__) for m in left))
        for block in blocks:
            if fcfg.activation_checkpointing:
                # The composable form adds hooks in place: parameter names (and so checkpoints)
                # stay the same as without it.
                from torch.distributed._composable import checkpoint

                checkpoint(block)
            if compiling.wanted(self):
                # Each block before it is sharded, in place (torchtitan's order): FSDP's hooks stay
                # outside the compiled code; the root's own layers stay eager (see compiling.py).
                block.compile()
            fully_shard(block, **shard)
        if compiling.wanted(self) and not blocks:
            model.compile()  # no blocks to compile one by one: the whole model, its one FSDP unit
        # The root's parameters are needed again at once by the backward: left to FSDP, which then
        # keeps them gathered after the forward. Passed True (strategy.fsdp.reshard_after_forward's
        # default), FSDP took it as the user's wish and freed them, to gather them again in the
        # backward: one all-gather of the root's unit (embeddings, head) per step more than a plain
        # fully_shard loop.
        fully_shard(model, **dict(shard, reshard_after_forward=_root_reshard(fcfg.reshard_after_forward)))
        # The task runs inside the root's forward (run_task): FSDP's pre- and post-forward around it.
        model._dist_train_task = _call_with(model)
        register_fsdp_forward_method(model, "_dist_train_task")
        if any(p.is_meta for p in model.parameters()):
            self._materialise(model)
        self.model = model
        self.optimizer = make_optimizer(model)
        self.scheduler = make_scheduler(self.optimizer)

    shards_module = True

    def run_task(self, fn: Callable[[nn.Module], T]) -> T:
        """``fn(model)`` inside the root's forward (FSDP's pre- and post-forward around it, as
        ``register_fsdp_forward_method`` does for a method): the root unit's parameters are gathered
        for the whole task, which may then call the model's submodules and methods or use those
        parameters directly; its ``model(x)`` inside is a nested forward, for which FSDP does not
        repeat the root's set-up. Called outside a forward, ``model.embed(x)`` met sharded
        parameters ("mixed torch.Tensor and DTensor")."""
        return self.model._dist_train_task(fn)

    def full_state(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for name, value in self.model.state_dict().items():
            if isinstance(value, DTensor):
                if value.device != self.device:  # (cpu_offload: shards in host memory, gathered on the device)
                    value = value.to(self.device)
                value = value.full_tensor()
            yield name, value

    def _materialise(self, model: nn.Module) -> None:
        """Allocate only this rank's shards, then fill them with the values a plain build draws."""
        if self._init_rng is None:
            raise RuntimeError("fsdp: a model on the meta device must be built inside strategy.init_context()")
        model.to_empty(device="cpu" if self.cfg.fsdp.cpu_offload else self.device)
        if self.cfg.fsdp.cpu_offload:
            # CPUOffloadPolicy keeps parameters in host memory, not buffers: they belong where the
            # forward runs. fully_shard moved them there only if they were real then (these were on
            # the meta device), so a BatchNorm met a GPU input with host statistics.
            for module in model.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    module._buffers[name] = buffer.to(self.device)
        # Afterwards the generator is where a plain build leaves it, so dropout draws match too.
        torch.set_rng_state(self._init_rng)
        with _FullInit():
            model.init_weights()

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts parameters and inputs

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        # Off: backward keeps unsharded gradients locally, no reduce-scatter; the final
        # micro-step reduces the accumulated sum once.
        self.model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)
