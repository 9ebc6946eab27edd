"""A real `mlflow server` on a loopback port: the job logs to it; then it dies, comes back and hangs.

The outage test is a choreography, not a race: the job is paused (SIGSTOP) at each point where
the server changes state, and each phase waits for an observable fact (a step in metrics.jsonl,
a metric in MLflow, a warning on stderr), so it does not depend on how fast this machine is.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, clean_env, free_port, ok, read_summary, run_cli  # noqa: F401  (ok is a fixture)
from test_mlflow import COMMON, assert_artifacts, assert_same_series, expected_series


class Server:
    """``mlflow server`` with a SQLite backend and proxied artifacts, both under ``root``."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc, self.starts = root, free_port(), None, 0
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 300) -> None:
        self.starts += 1
        log = open(self.root / f"server{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            env=clean_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)  # its own group: killpg reaches uvicorn too
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mlflow server did not come up:\n{(self.root / f'server{self.starts}.log').read_text()[-3000:]}")
            time.sleep(0.25)

    def ensure_up(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)  # also ends a stopped server
            self.proc.wait()
        deadline = time.monotonic() + 30
        while self.healthy() and time.monotonic() < deadline:  # uvicorn dies with its group
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield srv
    finally:
        srv.kill()


def records(run_dir: Path):
    """metrics.jsonl as it is now (the job may be writing its last line)."""
    out = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in records(run_dir) if "loss" in r), default=0)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def test_job_logs_to_a_tracking_server(server, tmp_path, ok):
    server.ensure_up()
    run_dir = tmp_path / "run"
    ok(run_cli([*COMMON, f"run.dir={run_dir}", "train.max_steps=20", "logging.every_steps=2", "eval.every_steps=10",
                "checkpoint.resume=never", f"logging.mlflow.tracking_uri={server.uri}",
                "logging.mlflow.experiment=server_test"], timeout=300))
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("server_test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == read_summary(run_dir)["mlflow_run_id"] and run.info.status == "FINISHED"
    assert_same_series(client, run, records(run_dir))
    assert_artifacts(client, run, run_dir)
    # nothing of the embedded store: the server keeps runs and (proxied) artifacts
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "mlartifacts").exists()
    assert list((server.root / "artifacts").rglob("loss.png"))


def test_server_outage_neither_stops_training_nor_loses_metrics(server, tmp_path):
    """Up, dead (training goes on, one warning), back on the same port with the same store (what
    was buffered arrives, and what comes after), then hung until the job ends (exit 0, bounded)."""
    server.ensure_up()
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    run_dir, flush, max_steps = tmp_path / "run", 5.0, 300
    args = [*COMMON, f"run.dir={run_dir}", f"train.max_steps={max_steps}", "logging.every_steps=1",
            "eval.every_steps=50", "eval.max_batches=1", "checkpoint.resume=never",
            f"logging.mlflow.tracking_uri={server.uri}", "logging.mlflow.experiment=outage",
            f"logging.mlflow.flush_timeout_s={flush}", "debug.faults=step_sleep=0.05"]
    err_path = tmp_path / "stderr.txt"
    # At most 20 steps a second (debug.faults sleeps after each step), so
    # that no phase below can run out of steps however fast the machine; the job is paused
    # (SIGSTOP) only while the server restarts, which may take a minute on a busy machine.
    env = clean_env()
    with open(err_path, "w") as err:
        job = subprocess.Popen([sys.executable, "-m", "dist_train", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    run_id = None

    def stderr_has(text: str) -> bool:
        return text in err_path.read_text()

    def mlflow_steps() -> list:
        return sorted(m.step for m in client.get_metric_history(run_id, "loss"))

    def mlflow_has_all_up_to(step: int) -> bool:
        want = {r["step"] for r in records(run_dir) if "loss" in r and r["step"] <= step}
        return want <= set(mlflow_steps())

    def running(what: str) -> None:
        assert job.poll() is None, f"the job ended before {what}:\n{err_path.read_text()[-3000:]}"

    try:
        # 1. The server is up: the first steps reach it, in order.
        wait_for(lambda: stderr_has("MLflow run ") or job.poll() is not None, 300, "the MLflow run")
        run_id = client.search_runs([client.get_experiment_by_name("outage").experiment_id])[0].info.run_id
        wait_for(lambda: max(mlflow_steps(), default=0) >= 10, 60, "the first steps in MLflow")
        running("the outage")
        # 2. The server dies; training goes on, and one warning says so.
        server.kill()
        s_kill = last_step(run_dir)
        wait_for(lambda: stderr_has("is unreachable") and last_step(run_dir) >= s_kill + 30, 60,
                 "steps and the warning during the outage")
        job.send_signal(signal.SIGSTOP)
        running("the restart")
        s2 = last_step(run_dir)
        # 3. The server comes back on the same port with the same store. The writer (not paused)
        #    reconnects and sends its buffer; once the job goes on, the rest of the outage's
        #    metrics and the ones logged after the restart arrive too.
        server.start()
        wait_for(lambda: stderr_has("reachable again"), 60, "the writer to reconnect")
        job.send_signal(signal.SIGCONT)
        wait_for(lambda: mlflow_has_all_up_to(s2) and max(mlflow_steps()) >= s2 + 20, 60,
                 "the outage's and the later metrics in MLflow")
        job.send_signal(signal.SIGSTOP)
        running("the hang")
        s3 = max(mlflow_steps())
        # 4. The server hangs (stopped: connections open, nobody answers) and the job runs to its
        #    end: it exits 0, and its exit waits at most flush_timeout_s (+ the writer's grace).
        server.signal(signal.SIGSTOP)
        job.send_signal(signal.SIGCONT)
        code = job.wait(timeout=600)
        ended = time.time()
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGCONT)
            job.kill()
            job.wait()
    stderr = err_path.read_text()
    assert code == 0, stderr[-5000:]
    close_s = ended - (run_dir / "summary.json").stat().st_mtime  # summary is written just before close
    assert close_s < flush + 3 + 6, f"exit took {close_s:.1f} s after the summary"
    outage_warnings = [line for line in stderr.splitlines() if "WARNING" in line and "is unreachable" in line]
    assert len(outage_warnings) == 1, outage_warnings
    assert "metric values not sent (MLflow unreachable)" in stderr  # the writer's report, in the final warning
    # metrics.jsonl is complete either way
    local = records(run_dir)
    assert sorted(r["step"] for r in local if "loss" in r) == list(range(1, max_steps + 1))
    # MLflow has every metric up to s3 (before, during and after the outage), each once
    server.signal(signal.SIGCONT)
    expected = expected_series(local)
    assert set(client.get_run(run_id).data.metrics) <= set(expected)
    for key, by_step in expected.items():
        history = client.get_metric_history(run_id, key)
        got = {m.step: m.value for m in history}
        assert len(got) == len(history), f"{key}: a step logged twice"
        early = {s: v for s, v in by_step.items() if s <= s3}
        assert {s: v for s, v in got.items() if s <= s3} == pytest.approx(early), key
        assert set(got) <= set(by_step), key  # whatever got through later is a real metric too
