"""Seeding of every RNG the job touches, and capturing/restoring their states for checkpoints.

What a checkpoint restores per rank: python's ``random``, numpy's global generator, torch's CPU
generator and every CUDA device's generator. DataLoader workers are not captured: each worker is
seeded from (run.seed, rank, worker id) when its process starts (see ``data/loader.py``), and our
datasets draw no random numbers, so a restarted worker produces exactly the batches the old one
would have. (A dataset with random augmentation would have to seed from (seed, epoch, sample
index) per sample to keep that property.) The data order itself comes from a generator seeded by
(seed, epoch), and the position in it is checkpointed as a global sample index.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with one value."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors, numbers and strings only, so that a checkpoint can
    hold them and ``torch.load(weights_only=True)`` can read them back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch_cpu"])
    cuda = state.get("torch_cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
