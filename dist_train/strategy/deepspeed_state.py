"""DeepSpeed's model weights in a form every strategy can read, and safe loading of its files.

Torch-native strategies (single, DDP, FSDP) save model and optimizer through DCP, which any of
them loads at any world size. DeepSpeed writes its own format *and*, through this module, its full
fp32 model weights into the same DCP layout (``model.<name>``). So weights cross in both
directions; the engine's partitioned optimizer state does not (a cross-format resume needs
``checkpoint.load_optimizer=false`` and says so: ``DeepSpeedStrategy.check_checkpoint``).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Dict, Iterator, Optional, Tuple

import torch


def model_shapes(module: torch.nn.Module) -> Dict[str, Tuple[int, ...]]:
    """``{name: global shape}`` of the engine's module (ZeRO-3 keeps the full shape in ``ds_shape``)."""
    return {k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in module.state_dict(keep_vars=True).items()}


def full_weights(module: torch.nn.Module, frozen: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Collective: the full fp32 weights of an engine's model (DeepSpeed ZeRO 1/2/3 keep the fp32
    master copy partitioned in the optimizer; ``safe_get_full_fp32_param`` assembles it), as CPU
    tensors. Parameters the optimizer does not hold (frozen) come from ``frozen`` (their fp32
    values, by name: under bf16/fp16 the module holds them rounded), else are the module's own,
    gathered under ZeRO-3; buffers are copied, floating ones in fp32."""
    frozen = frozen or {}
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    out: Dict[str, torch.Tensor] = {}
    seen: Dict[int, torch.Tensor] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, torch.nn.Parameter):
            if id(value) not in seen and name in frozen:
                seen[id(value)] = frozen[name]
            if id(value) not in seen:  # tied weights: assemble once, store under every name
                full = safe_get_full_fp32_param(value)
                if full is None and hasattr(value, "ds_id"):
                    # Not in the optimizer (frozen): ZeRO-3 holds only this rank's partition of it
                    # (empty on most ranks); gathered, every rank alike.
                    with zero.GatheredParameters([value]):
                        full = value.detach().to("cpu", torch.float32, copy=True)
                seen[id(value)] = (full if full is not None else value.detach()).detach().to("cpu", torch.float32, copy=True)
            out[name] = seen[id(value)]
        else:  # (floating buffers in fp32, as the weights: a SyncBatchNorm's statistics run in bf16/fp16 here)
            out[name] = value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype, copy=True)
    return out


def set_full_weights(module: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> None:
    """Collective: overwrite an engine's model with full weights, in both its fp32 master copy and
    the module's (possibly partitioned, possibly low-precision) parameters."""
    from deepspeed import zero
    from deepspeed.utils import safe_set_full_fp32_param

    missing = sorted(set(module.state_dict(keep_vars=True)) - set(weights))
    if missing:
        raise KeyError(f"checkpoint lacks model tensors: {', '.join(missing[:5])}")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    done = set()
    with torch.no_grad():
        for name, value in module.state_dict(keep_vars=True).items():
            if id(value) in done:
                continue
            done.add(id(value))
            src = weights[name]
            if isinstance(value, torch.nn.Parameter):
                safe_set_full_fp32_param(value, src.to(value.device, torch.float32))
                if hasattr(value, "ds_id"):  # ZeRO-3: gather, let rank 0 write, re-partition
                    with zero.GatheredParameters([value], modifier_rank=0):
                        if rank == 0:
                            value.data.copy_(src.to(value.dtype))
                    continue
            value.data.copy_(src.to(value.device, value.dtype))


# DeepSpeed's own checkpoint files hold these classes besides tensors and containers.
_ENGINE_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


@contextlib.contextmanager
def safe_engine_loads(engine) -> Iterator[None]:
    """While an engine loads its own checkpoint: its ``torch.load(weights_only=False)`` becomes
    ``weights_only=True`` with only the engine's few plain data classes allowed, so a crafted
    checkpoint cannot run code. (DeepSpeed reads every file through ``engine.checkpoint_engine``.)"""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None or not hasattr(ckpt_engine, "load"):
        yield
        return
    allowed = []
    for module, name in _ENGINE_SAFE_GLOBALS:
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass

    def load(path, map_location=None, *args, **kwargs):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    ckpt_engine.load = load  # an instance attribute shadows the class method
    try:
        yield
    finally:
        del ckpt_engine.load
