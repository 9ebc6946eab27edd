"""The checkpoint of the best evaluation (``checkpoint.best_metric``): a plain loop's
``if acc > best: torch.save(model.state_dict(), "best.pth")``.

When an evaluation improves on the best value so far, the manager saves a checkpoint at that step
(if the cadence did not already) and, once it is committed, rank 0 points ``checkpoints/best.json``
at it (``{"checkpoint", "step", "metric", "value", "mode"}``, written atomically). Retention never
deletes the checkpoint ``best.json`` names, whatever ``checkpoint.keep_last``; summary.json's
``best`` tells where it is (``model.init_from=<its path>`` or ``python -m dist_train.checkpoint
export <its path> best.safetensors`` take it from there). A resumed run takes the best value
recorded up to the step it resumes from; a fresh start in the same run dir starts from none.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Dict, Optional

from dist_train.checkpoint import layout
from dist_train.config.schema import ConfigError

log = logging.getLogger(__name__)

BEST = "best.json"
# Metrics a lower value of which is better, by a part of their name (checkpoint.best_mode=auto).
LOWER_IS_BETTER = ("loss", "perplexity", "error", "mae", "mse", "bpb", "bits_per")


def resolve_mode(metric: str, mode: str) -> str:
    """``checkpoint.best_mode``: min or max as given; auto: min for a loss, perplexity, error or
    bits per byte, else max (accuracies)."""
    if mode != "auto":
        return mode
    return "min" if any(part in metric for part in LOWER_IS_BETTER) else "max"


def read_best(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """``best.json`` of ``ckpt_dir`` when it names a checkpoint that is there, else None."""
    try:
        with open(os.path.join(ckpt_dir, BEST), encoding="utf-8") as f:
            info = json.load(f)
        name = str(info["checkpoint"])
        int(info["step"]), float(info["value"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if layout.parse_step(name) is not None and os.path.isdir(os.path.join(ckpt_dir, name)) else None


def best_step(ckpt_dir: str) -> Optional[int]:
    """The step of the checkpoint ``best.json`` names (retention keeps it), or None."""
    info = read_best(ckpt_dir)
    return int(info["step"]) if info else None


class BestCheckpoint:
    """Which evaluation is the best so far, and the marking of its checkpoint (rank 0 writes).
    Every method is called on every rank alike (evaluation results are the same on every rank)."""

    def __init__(self, metric: str, mode: str, ckpt_dir: str, rank0: bool):
        self.metric, self.mode = metric, resolve_mode(metric, mode)
        self.dir, self.rank0 = ckpt_dir, rank0
        self.value: Optional[float] = None   # the best value so far
        self.marked: Optional[Dict[str, Any]] = None   # what best.json says
        self.unmarked: Optional[Dict[str, Any]] = None  # a better evaluation whose checkpoint is not committed yet

    def restore(self, resumed_step: Optional[int], broadcast: Callable[[Any], Any]) -> None:
        """Collective, at the start: the best recorded up to ``resumed_step`` (None: a fresh start,
        which forgets an earlier timeline's best)."""
        info = read_best(self.dir) if self.rank0 and resumed_step is not None else None
        if info is not None and (int(info["step"]) > resumed_step or info.get("metric") != self.metric):
            info = None  # (a later step of an abandoned timeline, or another metric: not this run's bar)
        info = broadcast(info)
        self.marked, self.value = info, (float(info["value"]) if info else None)

    def improved(self, step: int, results: Optional[Dict[str, Any]]) -> bool:
        """Whether the evaluation ``results`` of ``step`` (None: none at this step) is the best so
        far; then its checkpoint is to be saved and marked."""
        if results is None:
            return False
        if self.metric not in results:
            raise ConfigError("checkpoint.best_metric", f"{self.metric!r} is not among the evaluation's metrics: "
                                                        f"{', '.join(sorted(results))}")
        value = float(results[self.metric])
        if math.isnan(value) or (self.value is not None and
                                 not (value < self.value if self.mode == "min" else value > self.value)):
            return False
        self.value = value
        self.unmarked = {"checkpoint": layout.step_name(step), "step": step, "metric": self.metric,
                         "value": value, "mode": self.mode}
        return True

    def committed(self, step: Optional[int]) -> None:
        """The checkpoint of ``step`` is committed: mark it when it holds the best evaluation."""
        if self.unmarked is None or self.unmarked["step"] != step:
            return
        info, self.unmarked = self.unmarked, None
        if self.rank0:
            layout.write_atomic(os.path.join(self.dir, BEST), json.dumps(info, indent=2, sort_keys=True) + "\n")
            log.info("best %s so far: %.6g at step %d (%s)", self.metric, info["value"], step, info["checkpoint"])
        self.marked = info

    def summary(self) -> Optional[Dict[str, Any]]:
        """summary.json's ``best``: the marked checkpoint, its step, metric and value (None: none yet)."""
        if self.marked is None:
            return None
        return {**self.marked, "path": os.path.join(self.dir, self.marked["checkpoint"])}
