"""The MLflow writer: a helper process that owns rank 0's MLflow client.

    python -m dist_train.logging.mlflow_writer '<json options>'   (started by logging/mlflow.py)

Rank 0 sends JSON lines on stdin ({"t": "start"|"m"|"close", ...}); this process answers on
stdout ({"t": "run", "run_id"} once the run exists, {"t": "closed", ...} at the end). It runs in
its own process so that MLflow's blocking HTTP retries and timeouts (read from environment
variables) can be set tight here without touching the training process's environment, and so
that nothing MLflow does (SQLAlchemy, protobuf, HTTP, matplotlib) competes for the trainer's GIL.

Metrics wait in a bounded buffer and go out in batches of up to 1000 at most once a second. When
the server cannot be reached they stay buffered and are retried with backoff; one warning says so.
At close the buffer is flushed until ``flush_timeout_s``, then the artifacts are logged and the
run gets its final status. If rank 0 dies without closing, its pipe closes and the run is
marked FAILED the same way. No torch here: of dist_train, only mlflow_buffer.py and plots.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from dist_train.logging import mlflow_run
from dist_train.logging.mlflow_buffer import MAX_BUFFERED, MetricBuffer, sanitize_name
from dist_train.logging.mlflow_run import is_permanent

log = logging.getLogger("dist_train.mlflow")

MAX_BATCH = 1000         # MLflow's limit of entities per log_batch call
MAX_PARAMS_TAGS = 100    # MLflow's limit of params (and of tags) per log_batch call
SEND_INTERVAL_S = 1.0    # steady state: at most one batch call a second
HTTP_TIMEOUT_S = 10      # per HTTP request (MLflow's default is 120 s, with 7 retries)
RETRY_MAX_S = 10.0       # backoff cap between attempts while the server is unreachable
STATUS = {"completed": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}


class Writer:
    """Owns the MLflow client; ``run()`` is the whole life of the process."""

    def __init__(self, opts: Dict[str, Any], emit: Callable[[dict], None]):
        self.uri = opts["tracking_uri"]
        self.experiment = opts["experiment"]
        self.artifact_location = opts.get("artifact_location")
        self.flush_timeout = float(opts["flush_timeout_s"])
        self.metrics_path = opts.get("metrics_path")
        self.artifacts: List[List[str]] = list(opts.get("artifacts", []))
        self.parent_pid = int(opts.get("parent_pid", os.getppid()))
        self.emit = emit
        self.buffer = MetricBuffer(int(opts.get("max_buffered", MAX_BUFFERED)))
        self.inbox: "queue.Queue[dict]" = queue.Queue()
        self.client = None
        self.experiment_id: Optional[str] = None
        self.start: Optional[dict] = None
        self.run_id: Optional[str] = None
        self.run_ready = False
        self.entities: List[Any] = []          # params and tags still to send, before any metric
        self.sent = mlflow_run.SentPoints()  # a continued run: the points it holds already
        self.close: Optional[dict] = None
        self.deadline = math.inf
        self.gave_up: Optional[str] = None
        self.reported: Any = ()                 # the run id last told to rank 0 (() = nothing yet)
        self.failing = self.warned = False
        self.next_try, self.backoff = 0.0, 1.0
        self.rejected = 0

    # --- input ----------------------------------------------------------------------------

    def read(self, stream) -> None:
        """Reader thread: metrics straight into the buffer, everything else to the inbox."""
        for line in stream:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("t") == "m":
                self.buffer.add(int(msg["step"]), int(msg["ts"]), msg["v"])
            else:
                if msg.get("t") == "close":
                    self.deadline = time.monotonic() + self.flush_timeout
                self.inbox.put(msg)
        self.inbox.put({"t": "eof"})

    def _handle(self, msg: dict) -> None:
        kind = msg.get("t")
        if kind == "start" and self.start is None:
            self.start = msg
            if self.gave_up:
                self._report_run(error=self.gave_up)
        elif kind == "close" and self.close is None:
            self.close = msg
        elif kind == "eof" and self.close is None:
            # Rank 0 went away without closing: it crashed or was killed.
            log.warning("the training process exited without closing the MLflow run; marking it FAILED")
            self.close = {"status": "failed", "artifacts": []}
            self.deadline = time.monotonic() + self.flush_timeout

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        self._attempt(self._connect)  # early (creates a SQLite store), while rank 0 still loads its data
        last_send = 0.0
        while True:
            try:
                self._handle(self.inbox.get(timeout=0.25))
            except queue.Empty:
                pass
            if self.close is None and os.getppid() != self.parent_pid:
                self._handle({"t": "eof"})
            now = time.monotonic()
            if self.close is not None and (self.start is None or self.gave_up or now >= self._flush_end()):
                break
            if self.start is None or self.gave_up or now < self.next_try:
                continue
            if self.close is None and self.run_ready and now - last_send < SEND_INTERVAL_S:
                continue
            last_send = now
            if self._attempt(self._sync) and self.close is not None and not len(self.buffer):
                break
        self._finish()

    def _flush_end(self) -> float:
        """Metrics may be sent until here; the rest of the deadline is for artifacts and status."""
        return self.deadline - min(5.0, 0.25 * self.flush_timeout)

    def _attempt(self, fn: Callable[[], None], warn: bool = True) -> bool:
        """Run ``fn``; on a transient error keep everything and retry later with backoff."""
        self._set_http_timeout()
        waiting = len(self.buffer)
        try:
            fn()
        except Exception as exc:
            if is_permanent(exc):  # only from opening the run: _batch drops refused batches itself
                self.gave_up = str(exc).splitlines()[0][:500]
                log.error("MLflow logging stops for this run: %s (metrics.jsonl has every metric)", self.gave_up)
                self._report_run(error=self.gave_up)
                return False
            if warn and not self.warned:
                self.warned = True
                log.warning("MLflow at %s is unreachable (%s). Training continues; metrics are kept (up to %d "
                            "values) and retried; metrics.jsonl has every metric.", self.uri,
                            str(exc).splitlines()[0][:300], self.buffer.capacity)
            elif warn and not self.failing:
                log.info("MLflow at %s is unreachable again; retrying", self.uri)
            self.failing = warn or self.failing
            # Closing: retry often, the deadline bounds it anyway.
            self.next_try = time.monotonic() + (min(self.backoff, 1.0) if self.close else self.backoff)
            self.backoff = min(self.backoff * 2, RETRY_MAX_S)
            if warn:
                self._report_run(error=str(exc).splitlines()[0][:300])
            return False
        if self.failing:
            log.info("MLflow at %s is reachable again; sent the %d metric values buffered meanwhile", self.uri, waiting)
        self.failing, self.backoff = False, 1.0
        return True

    def _set_http_timeout(self) -> None:
        """Read by MLflow on every request. At most half the flush timeout, so that a request
        already waiting when rank 0 closes ends in time; near the deadline, within it."""
        left = self.deadline - time.monotonic()
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, min(HTTP_TIMEOUT_S, self.flush_timeout / 2, left))))

    def _report_run(self, error: Optional[str] = None) -> None:
        """Tell rank 0 the run id on the first attempt and whenever it changes."""
        if self.start is None:
            return
        # Until the server answers, a resumed run keeps its id, so checkpoints carry it forward.
        run_id = self.run_id or (None if self.gave_up else self.start.get("resume_run_id"))
        if run_id != self.reported:
            self.reported = run_id
            self.emit({"t": "run", "run_id": run_id, "error": error})

    # --- MLflow calls -----------------------------------------------------------------------

    def _connect(self) -> None:
        if self.client is None:
            from mlflow import MlflowClient

            self.client = MlflowClient(self.uri)  # a SQLite store is created and migrated here
        if self.experiment_id is None:
            self.experiment_id = mlflow_run.experiment_id(self.client, self.experiment, self.artifact_location, self.uri)

    def _open_run(self) -> None:
        self._connect()
        self.run_id, self.entities, self.sent = mlflow_run.open_run(self.client, self.experiment_id,
                                                                            self.start, self.uri)
        self._backfill(int(self.start.get("resume_step") or 0))
        self.run_ready = True
        self._report_run()

    def _backfill(self, resume_step: int) -> None:
        """A resumed job: metrics.jsonl's points up to ``resume_step`` (the job trains on after it)
        that the run lacks: those an earlier attempt still had queued when it crashed, or every one
        when the run is new."""
        if resume_step <= 0 or not self.metrics_path or not os.path.isfile(self.metrics_path):
            return
        now, added = int(time.time() * 1000), 0
        with open(self.metrics_path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    step = int(record["step"])
                except (ValueError, KeyError, TypeError):
                    continue
                if step > resume_step:
                    break  # (the resumed job's own records: it logs them itself)
                values = {k: v for k, v in record.items()
                          if k != "step" and not self.sent.has(sanitize_name(k), step)}
                if values:
                    self.buffer.add(step, now, values)
                    added += 1
        if added:
            log.info("MLflow: %d logged step(s) up to step %d the run lacked are sent from metrics.jsonl", added,
                     resume_step)

    def _sync(self) -> None:
        """Open the run if needed, then send params/tags and every buffered metric."""
        from mlflow.entities import Metric, Param, RunTag

        if not self.run_ready:
            self._open_run()
        while self.entities:
            chunk = self.entities[:MAX_PARAMS_TAGS]
            self._batch(params=[e for e in chunk if isinstance(e, Param)], tags=[e for e in chunk if isinstance(e, RunTag)])
            del self.entities[:len(chunk)]
        while len(self.buffer):
            if self.close is not None and time.monotonic() >= self._flush_end():
                return
            rows = self.buffer.peek(MAX_BATCH)
            # (Points an earlier attempt sent, the resumed job logs again: not twice.)
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in rows if not self.sent.has(k, step)]
            if metrics:
                self._batch(metrics=metrics)
            self.buffer.pop(len(rows))

    def _batch(self, metrics=(), params=(), tags=()) -> None:
        self._set_http_timeout()
        try:
            self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags)
        except Exception as exc:
            if not is_permanent(exc):
                raise
            # The server refuses this batch and always will: drop it, keep going.
            if not self.rejected:
                log.error("MLflow rejected a batch (%s); dropped", str(exc).splitlines()[0][:300])
            self.rejected += len(metrics) + len(params) + len(tags)

    def _finish(self) -> None:
        """Artifacts, final status, and the report rank 0 prints in its last warning."""
        status = STATUS.get((self.close or {}).get("status", "failed"), "FAILED")
        terminated, artifacts_failed = False, 0
        if self.run_ready and not self.gave_up:
            files = [list(a) for a in self.artifacts] + [list(a) for a in (self.close or {}).get("artifacts", [])]
            try:
                from dist_train.logging.plots import loss_curves

                if self.metrics_path:
                    plot = loss_curves(self.metrics_path, os.path.join(os.path.dirname(self.metrics_path), "loss.png"))
                    if plot:
                        files.insert(0, [plot, "plots"])
            except Exception as exc:
                log.warning("could not draw the loss plot: %s", exc)
            for path, artifact_path in files:
                if not os.path.exists(path):
                    continue
                if time.monotonic() >= self.deadline:
                    artifacts_failed += 1
                    continue
                self._set_http_timeout()
                try:
                    self.client.log_artifact(self.run_id, path, artifact_path or None)
                except Exception as exc:
                    artifacts_failed += 1
                    log.warning("MLflow: could not log artifact %s: %s", path, str(exc).splitlines()[0][:300])
            self._set_http_timeout()
            try:
                self.client.set_terminated(self.run_id, status)
                terminated = True
            except Exception as exc:
                log.warning("MLflow: could not set run %s to %s: %s", self.run_id, status, str(exc).splitlines()[0][:300])
        self.emit({"t": "closed", "run_id": self.run_id, "unsent": len(self.buffer), "dropped": self.buffer.dropped,
                   "rejected": self.rejected, "terminated": terminated, "artifacts_failed": artifacts_failed,
                   "gave_up": self.gave_up, "status": status})


def _protocol_stream():
    """Keep the real stdout for our answers; anything a library prints goes to stderr instead."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def emit(msg: dict) -> None:
        with lock, contextlib.suppress(OSError, ValueError):  # rank 0 gone: nobody to tell
            out.write(json.dumps(msg) + "\n")
            out.flush()

    return emit


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = json.loads(argv[0])
    emit = _protocol_stream()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [rank0] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    # Ctrl-C and SLURM's SIGTERM are for the trainer; it closes us (or its pipe closes when it dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # This process's own environment: no retries inside MLflow (we retry, with the buffer), and a
    # per-request timeout that _set_http_timeout keeps inside the flush deadline.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(HTTP_TIMEOUT_S)
    writer = Writer(opts, emit)
    threading.Thread(target=writer.read, args=(sys.stdin,), daemon=True).start()
    import mlflow  # noqa: F401  (after the reader is up: importing takes seconds)

    for name in ("mlflow", "alembic", "urllib3", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    writer.run()
    return 0


if __name__ == "__main__":
    from dist_train.env.shutdown import exit_process

    exit_process(main())
