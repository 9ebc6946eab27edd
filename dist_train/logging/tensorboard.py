"""TensorBoard as a metric sink (``logging.tensorboard.enabled``): rank 0 writes every logged
scalar to ``<run.dir>/tensorboard``, the same values metrics.jsonl and MLflow get.

    tensorboard --logdir runs/<run.name>/tensorboard      # or --logdir runs/ to compare runs

``SummaryWriter`` queues events and writes them from its own thread, so ``log`` stays cheap on
the training path. A resumed run appends a new event file to the same folder; TensorBoard reads
them as one timeline, without the points an earlier attempt wrote past the step the run resumed
from (a purge mark: the resumed run writes those steps again). The events are flushed at every
checkpoint (``flush``), so a crash loses none up to the step a rerun resumes from.
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Dict

TENSORBOARD_DIR = "tensorboard"


class TensorBoardSink:
    """A metric sink: ``log(step, metrics)`` adds one scalar per numeric metric; ``close(status)``."""

    def __init__(self, run_dir: str, flush_secs: int = 30):
        # Imported here: it loads tensorboard and protobuf, a start-up cost only runs that log
        # to TensorBoard should pay.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(run_dir, TENSORBOARD_DIR)
        self._flush_secs = flush_secs
        self._writer = SummaryWriter(log_dir=self.log_dir, flush_secs=flush_secs)

    def resume_from(self, step: int) -> None:
        """The run continues after ``step``: TensorBoard drops earlier attempts' points past it
        (also at step 0: an attempt that ended before its first checkpoint wrote points too)."""
        earlier = [n for n in os.listdir(self.log_dir) if n.startswith("events.out.tfevents")] \
            if os.path.isdir(self.log_dir) else []
        if step > 0 or len(earlier) > 1:  # (one file is this writer's own)
            from torch.utils.tensorboard import SummaryWriter

            self._writer.close()
            self._writer = SummaryWriter(log_dir=self.log_dir, flush_secs=self._flush_secs, purge_step=step + 1)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        for name, value in metrics.items():
            # bool is a Number too, but not a curve anyone plots; None (no value this step) and
            # strings are skipped. Non-finite floats are kept: TensorBoard shows them as such.
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            self._writer.add_scalar(name, float(value), global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self, status: str = "completed") -> None:
        """Write the run's end status as a text summary, then flush and close the event file."""
        self._writer.add_text("status", status)
        self._writer.flush()
        self._writer.close()

