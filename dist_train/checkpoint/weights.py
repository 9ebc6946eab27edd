"""Model weights from a file a user has: ``model.init_from``.

Accepted: a ``torch.save``d state dict (``.pt``/``.pth``/``.bin``, read with ``weights_only``; a
dict holding it under ``model``/``state_dict``/``model_state_dict`` is unwrapped), a
``.safetensors`` file (a dist_train export is one), or a dist_train checkpoint (a checkpoint dir,
or a run or checkpoints dir meaning its newest), which must verify.
"""
from __future__ import annotations

import os
from typing import Dict

import torch

from dist_train.checkpoint import layout, storage
from dist_train.checkpoint.restore import resolve_path

WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """``{name: tensor}`` on the CPU; raises ValueError with a readable reason."""
    if not os.path.exists(path):
        raise ValueError(f"no such file or directory: {path}")
    if os.path.isdir(path):
        ckpt = resolve_path(path)
        errors = layout.verify(ckpt)
        if errors:
            raise ValueError(f"checkpoint {ckpt} does not verify: " + "; ".join(errors[:3]))
        return storage.load_full_model(os.path.join(ckpt, layout.DCP_DIR))
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle errors, a refused global, a truncated file)
        raise ValueError(f"{path} is not a state dict that torch.load(weights_only=True) reads: "
                         f"{str(exc).splitlines()[0][:300]}") from None
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sharded = [k for k, v in tensors.items() if type(v).__name__ == "DTensor"]
    if sharded:
        raise ValueError(f"{path} holds DTensor shards ({sharded[0]}, ...): one rank's pieces of a sharded (FSDP) "
                         "model's state dict, not its weights; start from the run's directory or checkpoint (or "
                         "its `python -m dist_train.checkpoint export`), or save the full weights")
    for prefix in WRAPPER_PREFIXES:  # saved from a DDP- or compile-wrapped model
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors
