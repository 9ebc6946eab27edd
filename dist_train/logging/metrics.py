"""Metric logging: rank 0 writes metrics.jsonl and fans out to sinks; other ranks get a no-op.

A sink is any object with ``log(step, metrics)`` and ``close(status)``, and optionally
``start(params, tags, resume_run_id)``, ``add_artifact(path, artifact_path)`` and ``run_id``;
MLflow is one of them. ``metrics.jsonl`` is written first and flushed per line, so it holds every
metric even when a remote sink is slow or down; sinks only enqueue, so ``log`` takes microseconds.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

from dist_train.logging.jsonl import last_record, last_value, records_at, replace_last_line, trim_jsonl

log = logging.getLogger(__name__)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class MetricLogger:
    """Rank 0's logger: ``metrics.jsonl`` plus any number of sinks."""

    active = True

    def __init__(self, path: str, sinks: Optional[List[Any]] = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self.sinks: List[Any] = list(sinks or [])
        self._tail: Optional[Dict[str, Any]] = None  # the file's last record (None: not known to be one)

    @property
    def run_id(self) -> Optional[str]:
        """The MLflow run id (None when MLflow is disabled or has not answered yet)."""
        for sink in self.sinks:
            if getattr(sink, "run_id", None):
                return sink.run_id
        return None

    def add_sink(self, sink: Any) -> None:
        self.sinks.append(sink)

    def start(self, params: Dict[str, Any], tags: Dict[str, Any], resume_run_id: Optional[str] = None,
              resume_step: int = 0) -> None:
        """Open the tracking run (after the checkpoint is restored, so a resumed job continues its run).

        The run dir holds one timeline: records that a killed or abandoned process wrote past the
        step this run resumes from (0 for a fresh start) are dropped before they are logged anew.
        """
        dropped = trim_jsonl(self.path, resume_step)
        if dropped:
            log.info("metrics.jsonl: dropped %d record(s) past step %d (the resumed timeline logs them anew)",
                     dropped, resume_step)
        self._tail = last_record(self.path)
        self._each("resume_from", resume_step)  # (sinks that can drop an abandoned timeline's points)
        self._each("start", params, tags, resume_run_id)

    def rewind(self, step: int) -> None:
        """Drop the records past ``step`` (a rollback); sinks that cannot delete points keep theirs."""
        self._file.flush()
        dropped = trim_jsonl(self.path, step)
        self._tail = last_record(self.path)
        log.info("metrics.jsonl: dropped %d record(s) past step %d after a rollback", dropped, step)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        """One JSON object per logged step: metrics of a step whose record is the file's last (a
        rerun's evaluation of the step an earlier attempt ended with) are added to that record."""
        values = {k: _scalar(v) for k, v in metrics.items()}
        record = {"step": step, **{k: _json_safe(v) for k, v in values.items()}}
        if self._tail is not None and self._tail.get("step") == step:
            record = {**self._tail, **record}
            self._file.close()
            try:
                replace_last_line(self.path, json.dumps(record) + "\n")
            finally:  # (a full disk: the old file stays, and the logger goes on with it)
                self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        self._tail = record
        self._each("log", step, values)

    def flush(self) -> None:
        """Everything logged so far to disk (fsynced), in the sinks that write files too (before
        each checkpoint's commit: a crash, even of the machine, loses no point up to the step a
        rerun resumes from)."""
        self._file.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError as exc:  # (a file system without fsync: the checkpoint goes ahead)
            log.warning("metrics.jsonl: fsync failed: %s", exc)
        self._each("flush")

    def last_logged(self, key: str) -> Any:
        """``key``'s last logged value in metrics.jsonl (this run's or, resumed, an earlier attempt's)."""
        self._file.flush()
        return last_value(self.path, key)

    def logged_at(self, step: int, prefix: str) -> Dict[str, Any]:
        """The metrics named ``prefix...`` logged at ``step`` in metrics.jsonl ({} if none)."""
        self._file.flush()
        return records_at(self.path, step, prefix)

    def add_artifact(self, path: str, artifact_path: str = "") -> None:
        """Attach a file to the run; sinks upload it at close."""
        self._each("add_artifact", path, artifact_path)

    def close(self, status: str = "completed") -> None:
        """``status``: completed, failed or preempted. Write summary.json before: it is logged too."""
        if self._file.closed:
            return
        self._each("close", status)
        if not self._file.closed:
            self._file.close()

    def _each(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            fn = getattr(sink, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as exc:  # a sink must never stop training
                log.warning("metric sink %s: %s failed: %s", type(sink).__name__, method, exc)


class NullMetricLogger:
    """What every rank but 0 holds: accepts everything, does nothing."""

    active = False
    run_id: Optional[str] = None
    sinks: List[Any] = []

    def add_sink(self, sink: Any) -> None:
        pass

    def start(self, params: Dict[str, Any], tags: Dict[str, Any], resume_run_id: Optional[str] = None,
              resume_step: int = 0) -> None:
        pass

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass

    def last_logged(self, key: str) -> Any:
        return None

    def logged_at(self, step: int, prefix: str) -> Dict[str, Any]:
        return {}

    def flush(self) -> None:
        pass

    def add_artifact(self, path: str, artifact_path: str = "") -> None:
        pass

    def close(self, status: str = "completed") -> None:
        pass


def build_metric_logger(run_dir: str, is_rank0: bool, mlflow_cfg=None, tensorboard_cfg=None):
    """Rank 0: metrics.jsonl, plus MLflow when ``mlflow_cfg.enabled`` and TensorBoard when
    ``tensorboard_cfg.enabled``; other ranks: a no-op."""
    if not is_rank0:
        return NullMetricLogger()
    logger = MetricLogger(os.path.join(run_dir, "metrics.jsonl"))
    if mlflow_cfg is not None and mlflow_cfg.enabled:
        try:
            from dist_train.logging.mlflow import MLflowSink

            logger.add_sink(MLflowSink(mlflow_cfg, run_dir))
        except Exception as exc:
            log.warning("MLflow logging is off for this run: %s", exc)
    if tensorboard_cfg is not None and tensorboard_cfg.enabled:
        try:
            from dist_train.logging.tensorboard import TensorBoardSink

            logger.add_sink(TensorBoardSink(run_dir))
        except Exception as exc:
            log.warning("TensorBoard logging is off for this run: %s", exc)
    return logger
