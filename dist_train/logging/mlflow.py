"""MLflow tracking on rank 0: one run per job, continued across restarts, never in the way.

    params, tags = describe_run(job, cluster, strategy_name)   # every rank (gathers host names)
    metrics.start(params, tags, resume_run_id)                  # rank 0's MetricLogger -> MLflowSink
    metrics.log(step, {...})                                    # enqueues: microseconds
    metrics.close("completed" | "failed" | "preempted")         # bounded by flush_timeout_s

The sink talks to MLflow through a writer process (``mlflow_writer.py``): MLflow's HTTP client
reads its retry count and timeout from environment variables, and with a dead server one call
blocks for minutes. The writer sets tight values in its own environment and retries with its own
bounded buffer, so neither the training step nor the exit waits on the network, and the user's
environment stays as it was. (MLflow's ``log_batch(synchronous=False)`` queue was not enough on
its own: it drops a batch that fails, has no bound, and joins its threads without a timeout.)
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, Dict, List, Optional, Tuple

import torch

from dist_train.config.load import flatten, to_dict
from dist_train.env import collectives
from dist_train.env.cluster import ClusterEnv, hostname

log = logging.getLogger("dist_train.mlflow")

MAX_QUEUED = 100_000   # log() calls waiting for the pipe to the writer; more are dropped and counted
PUMP_INTERVAL_S = 0.2  # the pipe is fed in batches: the pump thread wakes 5 times a second, not per log()
CLOSE_GRACE_S = 3.0    # beyond flush_timeout_s, for the writer to set the final status and exit


def _configured_uri(cfg) -> str:
    """``logging.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI`` (MLflow's own convention), else ''."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def tracking_uri(cfg, run_dir: str) -> str:
    """``logging.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store:
    a SQLite file in the run dir."""
    return _configured_uri(cfg) or "sqlite:///" + os.path.abspath(os.path.join(run_dir, "mlflow.db"))


def artifact_location(cfg, run_dir: str) -> Optional[str]:
    """Artifacts of the embedded store live next to it; a server (or a store named by the
    config or the environment) decides for itself."""
    return None if _configured_uri(cfg) else os.path.abspath(os.path.join(run_dir, "mlartifacts"))


# --- what a run records ---------------------------------------------------------------------


def gather_hostnames() -> List[str]:
    """Every rank's host name, in rank order. Collective: every rank must call it."""
    return [str(n) for n in collectives.all_gather_object(hostname())]


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _version(package: str) -> Optional[str]:
    """An installed package's version without importing it (importing deepspeed has side effects)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_version() -> Optional[str]:
    if not torch.cuda.is_available():
        return None
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:
        return None


def describe_run(job, cluster: ClusterEnv, strategy_name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(params, tags)`` for ``metrics.start``. Collective (host names): every rank calls it;
    the result matters only on rank 0, the others get empty dicts."""
    hosts = gather_hostnames()
    if not cluster.is_rank0:
        return {}, {}
    params = dict(flatten(to_dict(job)))
    tags: Dict[str, Any] = {
        "mlflow.runName": job.run.name,
        "strategy": strategy_name,
        "world_size": cluster.world_size,
        "num_nodes": cluster.num_nodes,
        "hosts": ",".join(sorted(set(hosts))),
        "precision": job.train.precision,
        "model": job.model.name,
        "dataset": job.data.name,
        "launcher": cluster.source,
        "run_dir": os.path.abspath(job.run.dir),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "nccl_version": _nccl_version(),
        "deepspeed_version": _version("deepspeed"),
        "mlflow.source.git.commit": _git_commit(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID") or (cluster.job_id if cluster.source == "slurm" else None),
    }
    return params, {k: v for k, v in tags.items() if v is not None}


# --- the sink --------------------------------------------------------------------------------


def _writer_env() -> Dict[str, str]:
    """The trainer's environment, plus the path to this package (it may not be installed)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class MLflowSink:
    """Rank 0's MLflow sink: ``log`` puts a message on a queue; a thread pipes it to the writer."""

    def __init__(self, cfg, run_dir: str):
        self.cfg = cfg
        self.uri = tracking_uri(cfg, run_dir)
        self.run_id: Optional[str] = None
        self.dropped = 0            # metric values dropped here because the queue was full
        self._lost = 0              # metric values that never reached the writer (it died)
        self._queue: deque = deque()      # append/popleft are atomic: log() takes no lock, wakes no one
        self._wake = threading.Event()
        self._answered = threading.Event()
        self._exited = threading.Event()
        self._report: Optional[dict] = None
        self._artifacts: List[List[str]] = []
        self._started = self._closing = self._broken = False
        self.run_dir = run_dir = os.path.abspath(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        opts = {
            "tracking_uri": self.uri, "experiment": cfg.experiment,
            "artifact_location": artifact_location(cfg, run_dir), "flush_timeout_s": cfg.flush_timeout_s,
            "metrics_path": os.path.join(run_dir, "metrics.jsonl"), "parent_pid": os.getpid(),
            "artifacts": [[os.path.join(run_dir, "config.yaml"), ""], [os.path.join(run_dir, "summary.json"), ""]],
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dist_train.logging.mlflow_writer", json.dumps(opts)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_writer_env(), text=True, encoding="utf-8",
            start_new_session=True,  # Ctrl-C in the terminal is for the trainer, which then closes us
        )
        threading.Thread(target=self._pump, name="mlflow-pump", daemon=True).start()
        threading.Thread(target=self._read, name="mlflow-read", daemon=True).start()

    # --- called by the MetricLogger -----------------------------------------------------------

    def resume_from(self, step: int) -> None:
        """The job resumed after ``step``: the writer fills in, from metrics.jsonl, the points up to
        it that the run lacks (a crash loses the ones still queued for MLflow)."""
        self._resume_step = int(step)

    def start(self, params: Dict[str, Any], tags: Dict[str, Any], resume_run_id: Optional[str] = None) -> None:
        """Open (or continue) the run; wait at most flush_timeout_s for MLflow to answer."""
        if self._started:
            return
        self._started = True
        self.run_id = resume_run_id  # until the writer answers: checkpoints keep carrying it
        self._queue.append({"t": "start", "params": params, "tags": tags, "resume_run_id": resume_run_id,
                            "resume_step": getattr(self, "_resume_step", 0)})
        self._wake.set()
        if not self._answered.wait(self.cfg.flush_timeout_s):
            log.warning("MLflow at %s did not answer within %.0f s (logging.mlflow.flush_timeout_s); training "
                        "starts and the run is opened in the background", self.uri, self.cfg.flush_timeout_s)

    def log(self, step: int, values: Dict[str, Any]) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self.dropped += len(values)
            return
        self._queue.append({"t": "m", "step": step, "ts": int(time.time() * 1000), "v": values})

    def add_artifact(self, path: str, artifact_path: str = "") -> None:
        """Log ``path`` into the run's ``artifact_path`` folder at close."""
        self._artifacts.append([os.path.abspath(path), artifact_path])

    def close(self, status: str = "completed") -> None:
        """Flush (bounded by flush_timeout_s), log the artifacts, set the run's final status."""
        if self._closing:
            return
        self._closing = True
        self._queue.append({"t": "close", "status": status, "artifacts": self._artifacts})
        self._wake.set()
        limit = self.cfg.flush_timeout_s + CLOSE_GRACE_S
        if not self._exited.wait(limit):
            log.warning("MLflow writer did not finish within %.0f s; stopping it", limit)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=1.0)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._final_warning()

    # --- background ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Feed the writer's stdin: everything queued, a few times a second, in one write."""
        pipe = self._proc.stdin
        while True:
            self._wake.wait(PUMP_INTERVAL_S)
            self._wake.clear()
            batch = []
            while self._queue:
                batch.append(self._queue.popleft())
            if not batch:
                continue
            if self._broken:
                self._lost += sum(len(m.get("v", ())) for m in batch)
            else:
                try:
                    pipe.write("".join(json.dumps(m, default=str) + "\n" for m in batch))
                    pipe.flush()
                except (OSError, ValueError):  # the writer is gone
                    self._broken = True
                    self._lost += sum(len(m.get("v", ())) for m in batch)
            if any(m["t"] == "close" for m in batch):
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()
                return

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("t") == "run":
                self.run_id = msg.get("run_id")
                self._answered.set()
            elif msg.get("t") == "closed":
                self._report = msg
                self.run_id = msg.get("run_id") or self.run_id
        self._broken = True
        self._answered.set()
        self._exited.set()
        if not self._closing:
            code = self._proc.wait()
            log.warning("the MLflow writer process exited (code %s); MLflow logging stops, metrics.jsonl "
                        "continues", code)

    def _final_warning(self) -> None:
        if not self._started:
            return  # the job failed before it got to open a run: nothing was tracked
        report = self._report
        if report is None:
            log.warning("MLflow: the writer ended without a report; some metrics may be missing from run %s "
                        "(metrics.jsonl has every metric)", self.run_id)
            return
        unsent = report["unsent"] + self._lost
        dropped = report["dropped"] + self.dropped
        problems = []
        if unsent:
            problems.append(f"{unsent} metric values not sent (MLflow unreachable)")
        if dropped:
            problems.append(f"{dropped} dropped (buffer full)")
        if report["rejected"]:
            problems.append(f"{report['rejected']} rejected by the server")
        if report["artifacts_failed"]:
            problems.append(f"{report['artifacts_failed']} artifacts not logged")
        if report["run_id"] and not report["terminated"]:
            problems.append(f"status {report['status']} not set")
        if report["run_id"] is None and not report.get("gave_up"):
            problems.append("no MLflow run could be created")
        if problems:
            log.warning("MLflow run %s at %s: %s; metrics.jsonl has every metric", report["run_id"], self.uri,
                        ", ".join(problems))
