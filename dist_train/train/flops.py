"""FLOPs per optimizer step, achieved TFLOP/s per device, and model FLOPs utilisation (MFU).

    flops = StepFlops.build(module, batch, task, job.train, device, world_size)   # before setup()
    flops.metrics(seconds, samples)   # {"tflops": ..., "mfu": ...} for samples trained in seconds

The FLOPs are the model's: one forward and one backward of each sample, the matrix products
only (linear layers, convolutions, attention; elementwise ops and the optimizer are left out, as
in every MFU figure), and no activation recompute (MFU, not hardware FLOPs utilisation). They
are counted once, before training:

- ``gpt``: analytically (:func:`gpt_flops`), from its shape (counted as below when layers are frozen);
- any other model, a user's included: ``torch.utils.flop_counter.FlopCounterMode`` over one
  forward and backward of one micro-batch through the task's loss, run on the meta device (the
  module's weights swapped for meta tensors for the call): no memory, no compute, no random
  draws, nothing in the module touched. Do it before the strategy wraps the module: FSDP and
  DeepSpeed hooks would gather real parameters.

``tflops`` is per device (the job's FLOP/s over the world size), so that ``mfu`` = ``tflops`` /
the device's peak at ``train.precision``: ``train.peak_tflops``, else the dense peak of a known
GPU (:data:`PEAKS`). On a CPU, or an unknown GPU, MFU is reported only with ``train.peak_tflops``.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from dist_train.models.gpt import GPT
from dist_train.train.tasks import batch_size, split_batch

log = logging.getLogger("dist_train")

# Dense peak TFLOP/s of one device, from the vendors' datasheets (the sparsity figures halved):
# (name pattern, {bf16, fp16, tf32, fp32}). tf32 counts under train.precision=fp32 when TF32
# matmuls are on (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision("high")).
# First match wins: the specific variants come before the family.
PEAKS: Tuple[Tuple[str, Dict[str, Optional[float]]], ...] = (
    (r"\bGH200\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH200 NVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH200\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH100 NVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH100\b", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (r"\bB200\b", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1125.0, "fp32": 75.0}),
    (r"\bA(100|800)\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bA40\b", {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"\bL40S\b", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL40\b", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bRTX A6000\b", {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"\bRTX 4090\b", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"\bRTX 3090\b(?! Ti)", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    # Volta and Turing: fp16 tensor cores, no bf16 or tf32.
    (r"\bV100S\b", {"bf16": None, "fp16": 130.0, "tf32": None, "fp32": 16.4}),
    (r"\bV100\b.*\bPCIE\b", {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0}),
    (r"\bV100\b", {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7}),  # SXM2
    (r"\bT4\b", {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1}),
    (r"\bMI300X\b", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
    # MI250X and MI250: per die (GCD), which is what PyTorch sees as one device (half the package).
    (r"\bMI250X\b", {"bf16": 191.5, "fp16": 191.5, "tf32": None, "fp32": 47.9}),
    (r"\bMI250\b", {"bf16": 181.0, "fp16": 181.0, "tf32": None, "fp32": 45.3}),
)


def table_peak(device_name: str, precision: str, tf32: bool = False) -> Optional[float]:
    """Dense peak TFLOP/s of the GPU named ``device_name`` (as ``torch.cuda.get_device_name``
    gives it) at ``precision`` (fp32 with ``tf32``: the TF32 tensor-core peak); None if unknown."""
    for pattern, peaks in PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            if precision == "fp32":
                return (peaks["tf32"] if tf32 else None) or peaks["fp32"]
            return peaks.get(precision)
    return None


def tf32_enabled(ops: str) -> bool:
    """Whether fp32 ``ops`` ("matmul": cuBLAS, "conv": cuDNN convolutions) run on TF32 tensor cores,
    as the user left torch's switches: the ``fp32_precision`` settings (the most specific one that is
    not "none" decides), else the legacy flags (``allow_tf32``, ``set_float32_matmul_precision``).
    Reading a legacy flag after the new API was used raises in torch, so the new one goes first."""
    backends = torch.backends
    chain = (backends.cuda.matmul,) if ops == "matmul" else (backends.cudnn.conv, backends.cudnn)
    try:
        for node in (*chain, backends):
            value = getattr(node, "fp32_precision", "none")
            if value != "none":
                return value == "tf32"
        if ops == "matmul":
            return bool(backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
        return bool(backends.cudnn.allow_tf32)
    except (AttributeError, RuntimeError):  # (a torch that has neither, or mixes them: the safe answer)
        return False


def device_peak(device: torch.device, precision: str, conv_share: float = 0.0) -> Tuple[Optional[float], str]:
    """(peak TFLOP/s from the table, or None; the device's name) for ``device``. Under fp32, matmuls
    and convolutions each run at the TF32 peak when TF32 is on for them (cuDNN's is, by default),
    so for a model whose FLOPs are ``conv_share`` convolutions the peak is the time-weighted mean of
    the two (the rate at which the device could run this mix of FLOPs)."""
    if device.type != "cuda":
        return None, device.type
    name = torch.cuda.get_device_name(device)
    matmul = table_peak(name, precision, tf32_enabled("matmul"))
    if precision != "fp32" or not conv_share or matmul is None:
        return matmul, name
    conv = table_peak(name, precision, tf32_enabled("conv"))
    return 1.0 / ((1.0 - conv_share) / matmul + conv_share / conv), name


def gpt_flops(model: GPT, samples: int, seq_len: int) -> int:
    """Forward + backward FLOPs of ``samples`` sequences of ``seq_len`` tokens through ``gpt``.

    Per token and layer, the four projections (qkv 3C x C, out C x C, MLP 2 x 4C x C) are
    2 x 12 C^2 multiply-adds' FLOPs; attention scores and their weighted sum 2 x 2 T C (the full
    T x T product: PyTorch's attention kernels and FlopCounterMode count it whole, causal or
    not); the head 2 C V. Backward is twice the forward (gradients of inputs and of weights).
    """
    vocab, width = model.wte.weight.shape
    forward_per_token = len(model.blocks) * (24 * width * width + 4 * seq_len * width) + 2 * width * vocab
    return 3 * forward_per_token * seq_len * samples


def _to_meta(value: Any) -> Any:
    return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value


def _meta_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Meta tensors for every parameter (as trainable as it is) and buffer of ``module``."""
    state = {name: _to_meta(t).requires_grad_(t.requires_grad) for name, t in module.named_parameters()}
    state.update({name: _to_meta(t) for name, t in module.named_buffers()})
    return state


def _counts(module: nn.Module, batch: Any, task) -> Dict[str, int]:
    """FLOPs by aten op of one forward and backward of ``batch`` through ``task.loss(module, batch)``,
    on the meta device: the module's parameters and buffers are swapped for meta tensors for the
    call (tied weights stay tied) and put back after it, so a task may call the module, one of its
    methods or a submodule; nothing real is computed, drawn or changed."""
    meta_batch = tree_map(_to_meta, batch)
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter, \
            _reparametrize_module(module, _meta_state(module), tie_weights=True):
        loss, _ = task.loss(module, meta_batch)
        if loss.requires_grad:
            loss.backward()
    return {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_flops(module: nn.Module, batch: Any, task) -> int:
    """FLOPs of one forward and backward of ``batch`` through ``task.loss(module, batch)``,
    counted by FlopCounterMode on the meta device (``module`` is left as it was)."""
    return sum(_counts(module, batch, task).values())


def flops_per_sample(module: nn.Module, batch: Any, task, samples: int) -> Tuple[float, float, str]:
    """(forward + backward FLOPs of one sample, the convolutions' share of them, how they were
    found) for ``module`` on ``batch``, a micro-batch of ``samples`` samples. The ``gpt`` formula
    assumes every weight is trained: with frozen layers (``model.freeze``) the backward is smaller,
    and FlopCounterMode counts it."""
    if isinstance(module, GPT) and all(p.requires_grad for p in module.parameters()):
        inputs, _ = split_batch(batch)
        return gpt_flops(module, 1, int(inputs.shape[1])), 0.0, "analytical (gpt)"
    counts = _counts(module, batch, task)
    total = sum(counts.values())
    conv = sum(n for op, n in counts.items() if "convolution" in op)
    return total / max(samples, 1), conv / total if total else 0.0, "counted by FlopCounterMode"


class StepFlops:
    """Achieved TFLOP/s per device and MFU at logging steps, from FLOPs counted once."""

    def __init__(self, per_sample: float, world_size: int, peak: Optional[float] = None):
        self.per_sample = per_sample   # forward + backward FLOPs of one sample
        self.world_size = world_size
        self.peak = peak               # TFLOP/s of one device; None: no MFU

    @classmethod
    def build(cls, module: nn.Module, batch: Any, task, train_cfg, device: torch.device, world_size: int,
              verbose: bool = True, samples: Optional[int] = None) -> Optional["StepFlops"]:
        """Count ``module``'s FLOPs on ``batch`` (one micro-batch of ``samples`` samples, by default
        its target's length; before any wrapping) and find the peak: ``train.peak_tflops``, else the
        table. None (with a warning) when the FLOPs cannot be counted: a model that needs real
        tensors (``.item()``, a host copy) in its forward."""
        try:
            per_sample, conv_share, how = flops_per_sample(module, batch, task,
                                                           batch_size(batch) if samples is None else samples)
        except Exception as exc:  # noqa: BLE001  (a user's model or task: report, never fail the job)
            if verbose:
                log.warning("tflops and mfu not reported: could not count the FLOPs of %s on the meta device: %s",
                            type(module).__name__, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
        try:
            peak, name = (float(train_cfg.peak_tflops), "train.peak_tflops") if train_cfg.peak_tflops > 0 else \
                device_peak(device, train_cfg.precision, conv_share)
        except Exception as exc:  # noqa: BLE001  (a driver or torch oddity must not fail the job)
            peak, name = None, f"{device} ({type(exc).__name__}: {exc})"
        if verbose:
            log.info("model FLOPs: %.4g GFLOP per sample (forward + backward, %s); peak %s", per_sample / 1e9, how,
                     f"{peak:g} TFLOP/s per device ({name}, {train_cfg.precision})" if peak else
                     f"unknown for {name}: no MFU (set train.peak_tflops)")
        return cls(per_sample, world_size, peak)

    def step_flops(self, global_batch: float) -> float:
        """FLOPs of one optimizer step of ``global_batch`` samples, all ranks together."""
        return self.per_sample * global_batch

    def metrics(self, seconds: float, samples: float) -> Dict[str, float]:
        """``{"tflops": per device, "mfu": of the peak}`` for ``samples`` (all ranks) trained in
        ``seconds``: one step, ``metrics(step_s, global_batch)``, or a rate, ``metrics(1.0, samples_per_s)``."""
        if seconds <= 0:
            return {}
        tflops = self.step_flops(samples) / seconds / self.world_size / 1e12
        out = {"tflops": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        return out
