"""Consolidated model weights of a committed checkpoint, as one file that plain PyTorch loads:
safetensors (``model.load_state_dict(safetensors.torch.load_file(OUT))``), or for a ``.pt`` /
``.pth`` name ``torch.save``'s format (``model.load_state_dict(torch.load(OUT))``). Any strategy,
any world size, no process group (it reads the committed files)."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict

import torch

from dist_train.checkpoint import layout, storage
from dist_train.checkpoint.restore import CheckpointError, resolve_path


EXPORT_SUFFIXES = (".safetensors", ".pt", ".pth")


def suffix_problem(out: str) -> str:
    """Why ``out`` cannot name an export (its suffix picks the format), or ""."""
    if out.lower().endswith(EXPORT_SUFFIXES):
        return ""
    return f"{out}: name the output .safetensors, or .pt / .pth for torch.save's format"


def export_weights(path: str, out: str) -> Dict[str, Any]:
    """Write the weights of checkpoint ``path`` to ``out`` (safetensors, or ``torch.save``'s format
    for a ``.pt``/``.pth`` name: see ``EXPORT_SUFFIXES``); ``path`` must verify. Returns what
    was written (step, tensors, parameters); raises CheckpointError otherwise."""
    from safetensors.torch import save_file

    problem = suffix_problem(out)
    if problem:
        raise ValueError(problem)
    errors = layout.verify(path)
    if errors:
        raise CheckpointError(f"{path} does not verify, refusing to export it: " + "; ".join(errors[:5]))
    weights = storage.load_full_model(os.path.join(path, layout.DCP_DIR))
    with open(os.path.join(path, layout.META), encoding="utf-8") as f:
        meta = json.load(f)
    # safetensors refuses shared storage (tied weights): every tensor gets its own copy.
    tensors = {k: v.detach().contiguous().clone() for k, v in weights.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = f"{out}.partial"  # (renamed into place once whole: an interrupted export leaves no half file)
    try:
        if out.lower().endswith(".safetensors"):
            save_file(tensors, partial, metadata={"step": str(meta["step"]),
                                                  "model": json.dumps(meta["config"]["model"]),
                                                  "dataset": str(meta["config"]["data"]["name"]),
                                                  "source": os.path.abspath(path)})
        else:  # .pt / .pth: the state dict torch.save writes, for torch.load + load_state_dict
            torch.save(tensors, partial)
        os.replace(partial, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    return {"step": meta["step"], "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values())}


def export_run(path: str, out: str) -> Dict[str, Any]:
    """Export a checkpoint dir, or the newest complete checkpoint of a run or checkpoints dir."""
    return export_weights(resolve_path(path), out)
