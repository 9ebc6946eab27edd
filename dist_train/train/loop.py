"""The training loop: readable in one sitting. Components own their cadence.

    while step < max_steps:
        loss, result = train_step(...)          # micro-steps, accumulation, clipping, optimizer step
        log / evaluate / checkpoint when due    # each component decides for itself
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from dist_train.env.process_group import all_reduce_sum
from dist_train.train.evaluate import evaluate
from dist_train.train.state import TrainState
from dist_train.train.step import train_step

WARMUP_STEPS = 5  # steps of each process left out of samples_per_s


def micro_batches(loader, sampler, state: TrainState) -> Iterator[tuple]:
    """Endless micro-batches starting at ``state``'s epoch and global sample position.

    The position advances as a batch is handed out (not when the loader prefetches it), so at
    every optimizer-step boundary ``state.position`` is exactly the data consumed.
    """
    while True:
        sampler.set_epoch(state.epoch)
        sampler.set_position(state.position)
        for batch in loader:
            state.position += sampler.global_batch_size
            state.samples_seen += sampler.global_batch_size
            yield batch
        state.epoch += 1
        state.position = 0


def record_sample_ids(batches: Iterator[tuple], state: TrainState, path: str) -> Iterator[tuple]:
    """Pass micro-batches through, appending each one's dataset indices (``batch[2]``) to ``path``
    as ``{"step": the optimizer step it feeds, "ids": [...]}``. Opt-in, for tests that prove a
    resume neither replays nor skips a sample (``DIST_TRAIN_RECORD_SAMPLE_IDS=1``)."""
    with open(path, "a", encoding="utf-8") as f:
        for batch in batches:
            f.write(json.dumps({"step": state.step + 1, "ids": batch[2].tolist()}) + "\n")
            f.flush()
            yield batch


class Throughput:
    """Steady-state samples/s of all ranks together.

    Counts only the time spent in optimizer steps (data wait included; evaluation and
    checkpoint time left out) and leaves out each process's first ``warmup`` steps.
    """

    def __init__(self, warmup: int = WARMUP_STEPS):
        self.warmup, self.steps = warmup, 0
        self.busy_s, self.samples = 0.0, 0
        self.window_s, self.window_samples = 0.0, 0

    def tick(self, samples: int, seconds: float) -> None:
        self.steps += 1
        if self.steps > self.warmup:
            self.busy_s += seconds
            self.samples += samples
        self.window_s += seconds
        self.window_samples += samples

    def window_rate(self) -> float:
        """samples/s over the steps since the previous call (for periodic logs)."""
        rate = self.window_samples / max(self.window_s, 1e-9)
        self.window_s, self.window_samples = 0.0, 0
        return rate

    def steady_rate(self) -> Optional[float]:
        return self.samples / self.busy_s if self.samples else None


def memory_mib(device: torch.device) -> Dict[str, float]:
    """Peak memory allocated by tensors on the GPU, or this process's resident set on the CPU."""
    if device.type == "cuda":
        return {"memory_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        with open("/proc/self/statm", encoding="ascii") as f:  # Linux; elsewhere no memory metric
            return {"memory_rss_mib": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20}
    except (OSError, ValueError, IndexError):
        return {}


@dataclass
class Hooks:
    """What runs after each optimizer step; every hook runs on every rank (collectives inside).

    ``stop_requested`` is asked after the hooks; it must give the same answer on every rank (the
    checkpoint manager's preemption flag is agreed by an all-reduce). A stopped run skips the
    final evaluation: it is being preempted and its time is short.
    """

    after_step: List[Callable[[TrainState], None]] = field(default_factory=list)
    stop_requested: Callable[[], bool] = lambda: False


def train(strategy, data: Iterator[tuple], eval_loader, state: TrainState, *, train_cfg, eval_cfg,
          log_every: int, task: str, metrics, progress, hooks: Hooks, global_batch: int,
          tokens_per_sample: int = 0) -> Dict[str, Any]:
    """Run optimizer steps until ``train_cfg.max_steps``; return the final metrics."""
    throughput = Throughput()
    last: Dict[str, Any] = {}
    last_eval: Dict[str, Any] = {}
    eval_step = -1
    stopped = False
    while state.step < train_cfg.max_steps and not stopped:
        t0 = time.perf_counter()
        loss, result = train_step(strategy, data, train_cfg)
        state.step += 1
        step_s = time.perf_counter() - t0
        throughput.tick(global_batch, step_s)
        if state.step % log_every == 0 or state.step == train_cfg.max_steps:
            # Mean over ranks of this step's loss; every rank joins the all-reduce.
            mean_loss = float(all_reduce_sum(loss.detach().double().clone()).item()) / strategy.cluster.world_size
            last = {
                "loss": mean_loss,
                "lr": strategy.scheduler.get_last_lr()[0],
                "grad_norm": result.grad_norm,
                "samples_per_s": throughput.window_rate(),
                "step_time_s": step_s,
                "epoch": state.epoch,
                "samples_seen": state.samples_seen,
            }
            if result.loss_scale is not None:
                last["loss_scale"] = result.loss_scale
            if tokens_per_sample:  # language models: samples/s x sequence length
                last["tokens_per_s"] = last["samples_per_s"] * tokens_per_sample
            last.update(memory_mib(strategy.device))
            metrics.log(state.step, last)
        progress.update(state.step, last)
        if eval_cfg.every_steps and state.step % eval_cfg.every_steps == 0:
            last_eval, eval_step = evaluate(strategy, eval_loader, task, eval_cfg.max_batches), state.step
            metrics.log(state.step, last_eval)
            progress.message(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        for hook in hooks.after_step:
            hook(state)
        stopped = hooks.stop_requested()
    if eval_step != state.step and not stopped:
        last_eval = evaluate(strategy, eval_loader, task, eval_cfg.max_batches)
        metrics.log(state.step, last_eval)
        progress.message(f"final eval at step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
    return {"train_loss": last.get("loss"), "samples_per_s": throughput.steady_rate(), **last_eval}
