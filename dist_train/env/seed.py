"""Seeding of every RNG the job touches, and capturing/restoring their states for checkpoints.

What a checkpoint restores per rank: python's ``random``, numpy's global generator, torch's CPU
generator and every CUDA device's generator. DataLoader workers are not captured: each worker is
seeded from (run.seed, rank, worker id) when its process starts (see ``data/loader.py``), and
random augmentation (``data/transforms.py``) seeds each sample from (seed, epoch, sample index), so
a restarted worker produces exactly the batches the old one would have. The data order itself comes from a generator seeded by
(seed, epoch), and the position in it is checkpointed as a global sample index.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any, Dict, Iterator

import numpy as np
import torch

log = logging.getLogger("dist_train")

_CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with one value."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed rank ``rank`` (> 0) re-seeds its streams with once the model is built (rank 0 draws
    on from ``seed``), so that dropout masks and a dataset's random transforms in the training
    process differ between ranks, as they would between the samples of one process's larger batch."""
    return (seed * 1_000_003 + rank * 7_919 + 1) % 2**63


@contextlib.contextmanager
def deterministic_kernels(on: bool) -> Iterator[None]:
    """``train.deterministic``: inside, torch picks deterministic kernels (cuDNN without autotuning,
    cuBLAS with a fixed workspace) and warns where an op has none; on leaving, the caller's
    settings are back (``dist_train.fit`` may run inside a user's process)."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, os.environ.get(_CUBLAS_WORKSPACE))
    # cuBLAS reads it when a device's handle is made: before the job's first matrix product.
    if _CUBLAS_WORKSPACE not in os.environ and torch.cuda.is_available() and torch.cuda.is_initialized():
        log.warning("train.deterministic: CUDA was already in use in this process before the job, so cuBLAS may "
                    "keep its workspace size; for bit-exact GPU runs set %s=:4096:8 before anything touches the "
                    "GPU (or run the job in a fresh process)", _CUBLAS_WORKSPACE)
    os.environ.setdefault(_CUBLAS_WORKSPACE, ":4096:8")
    # A caller's strict mode (errors, not warnings, where an op has no deterministic kernel) stays strict.
    torch.use_deterministic_algorithms(True, warn_only=before[1] if before[0] else True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        enabled, warn_only, cudnn_det, cudnn_bench, workspace = before
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, cudnn_bench
        if workspace is None:
            os.environ.pop(_CUBLAS_WORKSPACE, None)


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors, numbers and strings only, so that a checkpoint can
    hold them and ``torch.load(weights_only=True)`` can read them back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, python_gauss = random.getstate()
    return {
        # (the Mersenne Twister's 625 words as one tensor: as a tuple of ints, torch.save's
        # pickler visits each, 0.4 ms of every checkpoint)
        "python": (version, torch.tensor(internal, dtype=torch.int64), python_gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch_cpu": torch.get_rng_state(),
        # This rank's own device's only (the current one: set at the process group's start). Every
        # visible device's, as before, were restored only on a machine with as many: a resume under
        # another layout (torchrun's 8 visible GPUs, SLURM's one per task) lost its exactness.
        "torch_cuda_current": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured; the CUDA state into this rank's current device
    (a checkpoint from before 2026-12-07 holds every device's: restored when the count matches)."""
    version, internal, gauss = state["python"]  # (a tuple of ints in checkpoints before 2026-12-07)
    random.setstate((version, tuple(internal.tolist() if torch.is_tensor(internal) else internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch_cpu"])
    current = state.get("torch_cuda_current")
    if current is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(current)  # (the current device's)
    cuda = state.get("torch_cuda") or []
    if current is None and cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
