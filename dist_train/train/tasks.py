"""Loss and metrics per data task, so the loop stays task-agnostic."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; language models' [B, T, V] logits are flattened over tokens."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
    return F.cross_entropy(logits.float(), target)


def eval_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[sum of loss, correct predictions, count] over every token or sample of the batch."""
    if logits.dim() == 3:
        logits, target = logits.flatten(0, 1), target.flatten()
    loss = F.cross_entropy(logits.float(), target, reduction="sum")
    correct = (logits.argmax(dim=-1) == target).sum()
    return torch.stack([loss.double(), correct.double(), torch.tensor(target.numel(), dtype=torch.float64, device=loss.device)])


def eval_metrics(task: str, sums: torch.Tensor) -> dict:
    loss_sum, correct, count = (float(v) for v in sums)
    count = max(count, 1.0)
    out = {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}
    if task == "language_model":
        # One token is one byte, so bits per byte is the per-token loss in bits.
        out["eval_bpb"] = out["eval_loss"] / math.log(2)
    return out
