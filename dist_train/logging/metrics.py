"""Metric logging: rank 0 writes metrics.jsonl and fans out to sinks; other ranks get a no-op.

A sink is any object with ``log(step, metrics)`` and ``close(status)``; MLflow is one of them.
``metrics.jsonl`` is written first and flushed per line, so it holds every metric even when a
remote sink is slow or down.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class MetricLogger:
    """Rank 0's logger: ``metrics.jsonl`` plus any number of sinks."""

    active = True

    def __init__(self, path: str, sinks: Optional[List[Any]] = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        self.sinks: List[Any] = list(sinks or [])

    def add_sink(self, sink: Any) -> None:
        self.sinks.append(sink)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for sink in self.sinks:
            try:
                sink.log(step, record)
            except Exception as exc:  # a sink must never stop training
                log.warning("metric sink %s failed: %s", type(sink).__name__, exc)

    def close(self, status: str = "completed") -> None:
        for sink in self.sinks:
            try:
                sink.close(status)
            except Exception as exc:
                log.warning("closing metric sink %s failed: %s", type(sink).__name__, exc)
        self.sinks = []
        if not self._file.closed:
            self._file.close()


class NullMetricLogger:
    """What every rank but 0 holds: accepts everything, does nothing."""

    active = False
    sinks: List[Any] = []

    def add_sink(self, sink: Any) -> None:
        pass

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        pass

    def close(self, status: str = "completed") -> None:
        pass


def build_metric_logger(run_dir: str, is_rank0: bool):
    if not is_rank0:
        return NullMetricLogger()
    return MetricLogger(os.path.join(run_dir, "metrics.jsonl"))
