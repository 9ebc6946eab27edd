"""What the loop reports: training metrics at the logging cadence, evaluation results, throughput.

``Reporter.maybe_log`` is called after every optimizer step and decides for itself whether this
step is logged (``logging.every_steps``, and the last step); the loss is averaged over ranks
only then, and the gradient norm (a tensor) is read only then, so a step that is not logged never
waits for the device.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from dist_train.env import collectives
from dist_train.train.phases import PhaseClock

log = logging.getLogger("dist_train")

WARMUP_STEPS = 5  # steps of each process left out of samples_per_s


class Throughput:
    """Steady-state samples/s of all ranks together.

    Counts the loop's time per optimizer step (data wait, the step, the loop's bookkeeping and
    logging; evaluation and checkpoint saves left out) and leaves out each process's first
    ``warmup`` steps.
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


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        return float(value)
    return float(value)


class Reporter:
    """Rank 0 logs, every rank takes part in the loss average (a collective at logging steps)."""

    def __init__(self, strategy, metrics, progress, *, every: int, max_steps: int, global_batch: int,
                 tokens_per_sample: int = 0, grad_norms: int = 0, clock: Optional[PhaseClock] = None,
                 flops=None, start_step: int = 0):
        self.strategy, self.metrics, self.progress = strategy, metrics, progress
        self.every, self.max_steps, self.grad_norms = every, max_steps, grad_norms
        self.clock = clock or PhaseClock()
        self.flops = flops  # train.flops.StepFlops, or None
        self.evaluates: Optional[Callable[[int], bool]] = None  # step -> whether it is evaluated (a record)
        self._steps_in_window, self._data_warnings = 0, 0
        self._warmup_window: Dict[str, float] = {}  # the warmup steps' phase times in the current window
        self.global_batch, self.tokens_per_sample = global_batch, tokens_per_sample
        self.throughput = Throughput()
        self.last: Dict[str, Any] = {}
        # Steps up to ``recorded`` have their records (a resumed run's: in the file already); an
        # evaluation of a later step waits in ``_eval`` for that step's record, which it joins.
        self.recorded = start_step
        self._eval: Optional[Tuple[int, Dict[str, Any]]] = None

    def due(self, step: int) -> bool:
        """Whether ``step`` gets a record: every ``logging.every_steps``, the last step, and a step
        that is evaluated (``evaluates``, set by the job) or was (alike on every rank: the record's loss
        average is a collective)."""
        return (step % self.every == 0 or step == self.max_steps or bool(self._evaluated(step))
                or (self.evaluates is not None and self.evaluates(step)))

    def _evaluated(self, step: int) -> Dict[str, Any]:
        """The results of an evaluation of ``step`` waiting for its record ({} if none)."""
        return self._eval[1] if self._eval is not None and self._eval[0] == step else {}

    def grad_norms_wanted(self, step: int) -> int:
        """How many per-module gradient norms step ``step`` should report (steps that get a record)."""
        return self.grad_norms if self.grad_norms and self.due(step) else 0

    def maybe_log(self, state, output, step_s: float, busy_s: Optional[float] = None) -> None:
        """After every optimizer step, on every rank (``state``: the loop's TrainState; ``output``:
        the step's StepOutput; ``step_s``: the time of ``train_step``; ``busy_s``: the loop's time
        since the previous step, evaluation and saves left out, for throughput (default ``step_s``))."""
        self.throughput.tick(self.global_batch, step_s if busy_s is None else busy_s)
        self._steps_in_window += 1
        if self.throughput.steps == self.throughput.warmup:
            # The process's first steps (DataLoader workers starting, caches warming) stay in the
            # record's breakdown, but the data-wait warning judges the steps after them.
            self._warmup_window = dict(self.clock.window)
        if self.due(state.step):
            self.last = self._metrics(state, output, step_s)
            evaluated, self._eval = self._evaluated(state.step), None
            self.metrics.log(state.step, {**self.last, **evaluated})  # one object per logged step
        self.recorded = state.step
        self.progress.update(state.step, self.last)

    def log_stop(self, state, output, step_s: float) -> None:
        """The step a preemption stops at gets a record, off the cadence too (on every rank alike:
        the ranks agreed to stop), so that summary.json's ``train_loss`` is the loss of the last
        step trained, not of an earlier logged one (or none)."""
        if self.recorded != state.step or self.due(state.step):
            return  # (logged already, or not this step's output)
        self.last = self._metrics(state, output, step_s)
        self.metrics.log(state.step, dict(self.last))
        self.progress.update(state.step, self.last)

    def _metrics(self, state, output, step_s: float) -> Dict[str, Any]:
        result, names = output.result, sorted(output.metrics)
        # The loss and a task's own metrics, averaged over ranks in one all-reduce (every rank joins).
        values = torch.stack([output.loss.detach().double()]
                             + [output.metrics[k].detach().double().to(output.loss.device) for k in names])
        means = (collectives.all_reduce(values) / collectives.world_size()).tolist()
        out = {
            "loss": means[0],
            "lr": output.lr if output.lr is not None else self.strategy.lr,  # (the one the step used)
            "grad_norm": _scalar(result.grad_norm),
            "samples_per_s": self.throughput.window_rate(),
            "step_time_s": step_s,
            "epoch": state.epoch,
            "samples_seen": state.samples_seen,
            "skipped_steps": state.skipped_steps,
        }
        out.update(zip(names, means[1:]))
        out.update(result.grad_norms or {})
        if result.loss_scale is not None:
            out["loss_scale"] = _scalar(result.loss_scale)
        if self.tokens_per_sample:  # language models: samples/s x sequence length
            out["tokens_per_s"] = out["samples_per_s"] * self.tokens_per_sample
        if self.flops is not None:  # tflops per device, and mfu when the peak is known
            out.update(self.flops.metrics(1.0, out["samples_per_s"]))
        out.update(self._breakdown(state.step))
        out.update(memory_mib(self.strategy.device))
        return out

    def _breakdown(self, step: int) -> Dict[str, float]:
        """Mean seconds per step in each phase since the previous logging step (this rank's view),
        adding up to the mean iteration time; a warning when waiting for data exceeds 10% of it."""
        n = max(self._steps_in_window, 1)
        self._steps_in_window = 0
        phases = {k: v / n for k, v in self.clock.take().items()}
        iteration = sum(phases.values())
        out = {f"time/{k}_s": v for k, v in phases.items()}
        out["time/iteration_s"] = iteration
        out["data_wait_pct"] = 100.0 * phases["data"] / iteration if iteration > 0 else 0.0
        steady_pct = 0.0
        if self.throughput.steps > self.throughput.warmup:  # (else every step of the window is a warmup step)
            steady = {k: v * n - self._warmup_window.get(k, 0.0) for k, v in phases.items()}
            total = sum(steady.values())
            steady_pct = 100.0 * steady["data"] / total if total > 1e-9 else 0.0
        self._warmup_window = {}
        if steady_pct > 10 and self._data_warnings < 3:
            self._data_warnings += 1
            log.warning("step %d: waiting for data takes %.0f%% of each step; raise data.num_workers or "
                        "data.prefetch_factor (or make the dataset faster)", step, steady_pct)
        return out

    def rewind(self, step: int) -> None:
        """After a rollback to ``step``: the records past it belong to an abandoned timeline."""
        self.metrics.rewind(step)
        self.recorded, self._eval = step, None
        self.throughput.window_s, self.throughput.window_samples = 0.0, 0

    def log_eval(self, step: int, results: Dict[str, float], final: bool = False) -> None:
        """An evaluation's results join the record of ``step``: the coming one (the loop evaluates
        before it records the step), or, for a step recorded already, the existing record."""
        if step > self.recorded:
            self._eval = (step, dict(results))
        else:
            self.metrics.log(step, results)
        what = f"final eval at step {step}" if final else f"step {step}"
        self.progress.message(f"{what}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def summary(self) -> Dict[str, Any]:
        rate = self.throughput.steady_rate()
        # A run resumed at its last step trains no step: its loss is the last one logged before.
        loss = self.last.get("loss") if self.last else self.metrics.last_logged("loss")
        out = {"train_loss": loss, "samples_per_s": rate}
        if self.flops is not None and rate:
            out.update(self.flops.metrics(1.0, rate))
        return out
