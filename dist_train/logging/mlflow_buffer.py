"""What the MLflow writer holds while it cannot send: metric values, with names MLflow accepts.

Pure Python, no MLflow import: the writer's reader thread fills the buffer while MLflow is still
being imported.
"""
from __future__ import annotations

import functools
import itertools
import re
import threading
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

MAX_BUFFERED = 200_000   # metric values held while the server is unreachable (~100 bytes each)


@functools.lru_cache(maxsize=4096)
def sanitize_name(name: str) -> str:
    """A metric/param/tag key MLflow accepts on every platform: ``[/\\w.\\- ]``, a normalized
    relative path, at most 250 characters."""
    name = re.sub(r"[^/\w.\- ]", "_", str(name))
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    return ("/".join(parts) or "_")[:250]


def metric_value(raw: Any) -> Optional[float]:
    """A float for MLflow, or None for what is not a number (NaN and inf are numbers)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    return float(raw)


class MetricBuffer:
    """Metric values waiting to be sent: ``(key, value, timestamp_ms, step)``.

    Bounded: once ``capacity`` values wait, new ones are dropped (and counted) until the buffer
    drains. Dropping the newest keeps peek/pop race-free against the single sending thread.
    """

    def __init__(self, capacity: int = MAX_BUFFERED):
        self.capacity = capacity
        self.dropped = 0
        self._items: deque = deque()
        self._lock = threading.Lock()

    def add(self, step: int, timestamp_ms: int, values: Dict[str, Any]) -> None:
        rows = [(sanitize_name(k), v, timestamp_ms, step) for k, v in
                ((k, metric_value(raw)) for k, raw in values.items()) if v is not None]
        with self._lock:
            room = self.capacity - len(self._items)
            if room < len(rows):
                self.dropped += len(rows) - max(room, 0)
                rows = rows[:max(room, 0)]
            self._items.extend(rows)

    def peek(self, n: int) -> List[Tuple[str, float, int, int]]:
        with self._lock:
            return list(itertools.islice(self._items, n))

    def pop(self, n: int) -> None:
        with self._lock:
            for _ in range(min(n, len(self._items))):
                self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)
