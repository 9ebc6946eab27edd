"""The checkpoint of the best evaluation (``checkpoint.best_metric``): a plain loop's
``if acc > best: torch.save(model.state_dict(), "best.pth")``.

When an evaluation improves on the best value so far, the manager saves a checkpoint at that step
(if the cadence did not already) and, once it is committed (on the thread that committed it: the
writer thread of an async save), rank 0 points ``checkpoints/best.json`` at it (``{"checkpoint",
"step", "metric", "value", "mode"}``, written atomically). Retention never deletes the checkpoint
``best.json`` names, whatever ``checkpoint.keep_last``; summary.json's ``best`` tells where it is
(``model.init_from=<its path>`` or ``python -m dist_train.checkpoint export <its path>
best.safetensors`` take it from there). A run resumed from a checkpoint of its own run dir takes
the best recorded up to that step as its bar; a fresh start removes the pointer of an earlier
timeline (its checkpoints stay as they were). A best save that fails or is dropped leaves the bar
at the last marked one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from typing import Any, Callable, Dict, Optional

from dist_train.checkpoint import layout

log = logging.getLogger(__name__)

BEST = "best.json"
# Metrics a lower value of which is better (checkpoint.best_mode=auto): by a part of their name
# (eval_logloss, eval_crossentropy), or, for short abbreviations, by a whole word of it (eval_ce,
# not eval_balance).
LOWER_IS_BETTER_PARTS = ("loss", "perplexity", "error", "entropy", "distance")
LOWER_IS_BETTER_WORDS = frozenset({"ppl", "err", "mae", "mse", "rmse", "mape", "nll", "bpb", "bits", "wer", "cer",
                                   "fid", "kl", "ce"})


def resolve_mode(metric: str, mode: str) -> str:
    """``checkpoint.best_mode``: min or max as given; auto: min for a loss, perplexity, error,
    entropy, distance or bits per byte (``LOWER_IS_BETTER_*``), else max (accuracies, scores)."""
    if mode != "auto":
        return mode
    name = metric.lower()
    lower = any(part in name for part in LOWER_IS_BETTER_PARTS) or bool(LOWER_IS_BETTER_WORDS & set(name.split("_")))
    return "min" if lower else "max"


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


class BestCheckpoint:
    """Which evaluation is the best so far, and the marking of its checkpoint (rank 0 writes).
    ``improved`` and ``restore`` are called on every rank alike (evaluation results are the same
    on every rank); ``committed`` and ``failed`` by whichever thread committed or gave up a save."""

    def __init__(self, metric: str, mode: str, ckpt_dir: str, rank0: bool):
        self.metric, self.mode = metric, resolve_mode(metric, mode)
        self.dir, self.rank0 = ckpt_dir, rank0
        self.marked: Optional[Dict[str, Any]] = None   # what best.json says
        self.pending: Dict[int, Dict[str, Any]] = {}   # better evaluations whose checkpoints are not committed yet
        self.error: Optional[str] = None                # the metric is not among the evaluation's: not kept
        self._lock = threading.Lock()

    def restore(self, resumed_step: Optional[int], broadcast: Callable[[Any], Any]) -> None:
        """Collective, at the start: the best recorded up to ``resumed_step``, the step of a
        checkpoint of this run dir (None: a fresh start, or a checkpoint from elsewhere)."""
        info = None
        if self.rank0:
            if resumed_step is None:
                try:
                    os.remove(os.path.join(self.dir, BEST))  # (an earlier timeline's: not this run's bar)
                except FileNotFoundError:
                    pass
            else:
                info = read_best(self.dir)
                if info is not None and (int(info["step"]) > resumed_step or info.get("metric") != self.metric
                                         or info.get("mode") != self.mode):
                    info = None  # (a later step of an abandoned timeline, or another metric or mode)
            log.info("checkpoint.best_metric=%s: %s is better (checkpoint.best_mode=%s)%s", self.metric,
                     "lower" if self.mode == "min" else "higher", self.mode,
                     f"; the best so far: {info['value']:.6g} at step {info['step']}" if info else "")
        self.marked = broadcast(info)

    @property
    def protected(self) -> Optional[int]:
        """The step retention keeps (the marked best)."""
        marked = self.marked
        return int(marked["step"]) if marked else None

    def _bar(self) -> Optional[float]:
        values = [float(i["value"]) for i in [self.marked, *self.pending.values()] if i is not None]
        if not values:
            return None
        return min(values) if self.mode == "min" else max(values)

    def improved(self, step: int, results: Optional[Dict[str, Any]]) -> bool:
        """Whether the evaluation ``results`` of ``step`` (None: none at this step) is the best so
        far; then its checkpoint is to be saved, and marked once committed. A metric the
        evaluation does not report is said once (log, summary.json) and no best is kept: the run
        goes on (a typo in a task of one's own, whose names are not known before it evaluates)."""
        if results is None or self.error is not None:
            return False
        if self.metric not in results:
            self.error = (f"checkpoint.best_metric: {self.metric!r} is not among the evaluation's metrics "
                          f"({', '.join(sorted(results))}): no best checkpoint is kept")
            if self.rank0:
                log.error("%s", self.error)
            return False
        value = float(results[self.metric])
        with self._lock:
            bar = self._bar()
            if math.isnan(value) or (bar is not None and not (value < bar if self.mode == "min" else value > bar)):
                return False
            self.pending[step] = {"checkpoint": layout.step_name(step), "step": step, "metric": self.metric,
                                  "value": value, "mode": self.mode}
        return True

    def committed(self, step: Optional[int]) -> None:
        """The checkpoint of ``step`` is committed in this run dir: mark it when it holds the best
        evaluation."""
        with self._lock:
            info = self.pending.pop(step, None) if step is not None else None
            if info is None:
                return
            for earlier in [s for s in self.pending if s < step]:
                del self.pending[earlier]  # (worse than this one: their saves need not mark anything)
            if self.rank0:
                layout.write_atomic(os.path.join(self.dir, BEST), json.dumps(info, indent=2, sort_keys=True) + "\n")
                log.info("best %s so far: %.6g at step %d (%s)", self.metric, info["value"], step, info["checkpoint"])
            self.marked = info

    def token(self, step: int) -> Optional[Dict[str, Any]]:
        """What is pending for ``step`` when its save starts (``failed``'s argument)."""
        return self.pending.get(step)

    def failed(self, step: Optional[int], token: Optional[Dict[str, Any]]) -> None:
        """The save of ``step`` that started with ``token`` pending failed or was dropped: the bar
        goes back (an evaluation of the same step found best meanwhile, the final one while an
        async save of that step was in flight, stays pending for the save that follows)."""
        with self._lock:
            if token is not None and self.pending.get(step) is token:
                del self.pending[step]

    def summary(self) -> Optional[Dict[str, Any]]:
        """summary.json's ``best``: the marked checkpoint, its step, metric and value (None: none
        yet; ``{"error": ...}`` when the metric was not reported)."""
        if self.error is not None:
            return {"error": self.error}
        marked = self.marked
        if marked is None:
            return None
        return {**marked, "path": os.path.join(self.dir, marked["checkpoint"])}
