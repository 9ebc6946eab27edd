"""Consolidated model weights of a committed checkpoint, as one safetensors file that plain
PyTorch loads (``model.load_state_dict(safetensors.torch.load_file(OUT))``): any strategy, any
world size, no process group (it reads the committed files)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict

from dist_train.checkpoint import layout, storage
from dist_train.checkpoint.restore import CheckpointError, resolve_path


def export_weights(path: str, out: str) -> Dict[str, Any]:
    """Write the weights of checkpoint ``path`` to ``out``; ``path`` must verify. Returns what
    was written (step, tensors, parameters); raises CheckpointError otherwise."""
    from safetensors.torch import save_file

    errors = layout.verify(path)
    if errors:
        raise CheckpointError(f"{path} does not verify, refusing to export it: " + "; ".join(errors[:5]))
    weights = storage.load_full_model(os.path.join(path, layout.DCP_DIR))
    with open(os.path.join(path, layout.META), encoding="utf-8") as f:
        meta = json.load(f)
    # safetensors refuses shared storage (tied weights): every tensor gets its own copy.
    tensors = {k: v.detach().contiguous().clone() for k, v in weights.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out, metadata={"step": str(meta["step"]), "model": json.dumps(meta["config"]["model"]),
                                      "dataset": str(meta["config"]["data"]["name"]), "source": os.path.abspath(path)})
    return {"step": meta["step"], "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values())}


def export_run(path: str, out: str) -> Dict[str, Any]:
    """Export a checkpoint dir, or the newest complete checkpoint of a run or checkpoints dir."""
    return export_weights(resolve_path(path), out)
