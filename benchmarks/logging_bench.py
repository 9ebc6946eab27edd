"""What logging costs the training step, with a slow MLflow server, against a plain loop.

    .venv/bin/python benchmarks/logging_bench.py [--steps 300] [--rounds 5] [--latency-ms 200]

Starts a real ``mlflow server`` (SQLite, in a temp dir) behind a small HTTP proxy that delays
every request by ``--latency-ms``, then trains the same MLP on the same in-memory batches in
several modes, logging every step (what ``logging.every_steps=1`` does):

    plain          no logging at all
    jsonl          dist_train's MetricLogger, MLflow off (metrics.jsonl only)
    mlflow-slow    MetricLogger + MLflow through the slow proxy (the writer process does the HTTP)
    mlflow-sqlite  MetricLogger + the embedded SQLite store (the default)
    naive-sync     for contrast: MlflowClient.log_batch on the slow server inside the step

Modes take turns in rounds, so a load change on the machine hits them alike. Prints the median
and mean step time of each, the cost over plain, and the time of the log() call itself.
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dist_train.env.ports import free_port  # noqa: E402
from dist_train.logging.metrics import build_metric_logger  # noqa: E402

FEATURES, HIDDEN, CLASSES, BATCH = 784, 512, 10, 128


def start_server(root: str) -> subprocess.Popen:
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/server.db",
                             "--artifacts-destination", f"{root}/server_artifacts"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    proc.port = port
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start")


def start_slow_proxy(upstream_port: int, delay_s: float) -> ThreadingHTTPServer:
    """Forward every request to the server after ``delay_s``: a far-away or overloaded server."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            time.sleep(delay_s)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *args) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


class Trainer:
    """A plain PyTorch step: MLP forward/backward/AdamW on a fixed set of in-memory batches."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(),
                                         torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.batches = [(torch.randn(BATCH, FEATURES), torch.randint(0, CLASSES, (BATCH,))) for _ in range(16)]
        self.i = 0

    def step(self) -> float:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.item(), float(norm)


def run_steps(trainer: Trainer, steps: int, log, first_step: int, step_times, log_times) -> None:
    for n in range(first_step, first_step + steps):
        t0 = time.perf_counter()
        loss, norm = trainer.step()
        if log is not None:
            t1 = time.perf_counter()
            log(n, {"loss": loss, "lr": 1e-3, "grad_norm": norm, "samples_per_s": BATCH / max(t1 - t0, 1e-9),
                    "step_time_s": t1 - t0, "epoch": 0, "samples_seen": n * BATCH, "memory_rss_mib": 0.0})
            log_times.append(time.perf_counter() - t1)
        step_times.append(time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="steps per mode per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--naive-steps", type=int, default=10, help="steps of the naive synchronous mode per round")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="logging_bench_")
    server = start_server(root)
    proxy = start_slow_proxy(server.port, args.latency_ms / 1000)
    slow_uri = f"http://127.0.0.1:{proxy.server_address[1]}"
    print(f"mlflow server on :{server.port}, behind a proxy adding {args.latency_ms:.0f} ms per request: {slow_uri}")
    try:
        loggers = {
            "jsonl": build_metric_logger(f"{root}/jsonl", True, None),
            "mlflow-slow": build_metric_logger(f"{root}/slow", True, SimpleNamespace(
                enabled=True, tracking_uri=slow_uri, experiment="bench", log_model=False, flush_timeout_s=60.0)),
            "mlflow-sqlite": build_metric_logger(f"{root}/sqlite", True, SimpleNamespace(
                enabled=True, tracking_uri="", experiment="bench", log_model=False, flush_timeout_s=60.0)),
        }
        for name, logger in loggers.items():
            t0 = time.perf_counter()
            logger.start({"bench": name}, {"mode": name}, None)
            print(f"{name:14s} start(): {time.perf_counter() - t0:.2f} s (run {logger.run_id})")
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        naive = MlflowClient(slow_uri)
        naive_run = naive.create_run(naive.get_experiment_by_name("bench").experiment_id).info.run_id

        def naive_log(step, values):
            ts = int(time.time() * 1000)
            naive.log_batch(naive_run, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()])

        modes = {"plain": None, **{k: v.log for k, v in loggers.items()}, "naive-sync": naive_log}
        trainer = Trainer()
        run_steps(trainer, 50, None, 0, [], [])  # warm-up
        step_times = {m: [] for m in modes}
        log_times = {m: [] for m in modes}
        step = {m: 1 for m in modes}
        for _ in range(args.rounds):
            for mode, log in modes.items():
                n = args.naive_steps if mode == "naive-sync" else args.steps
                run_steps(trainer, n, log, step[mode], step_times[mode], log_times[mode])
                step[mode] += n
        close_s = {}
        for name, logger in loggers.items():
            t0 = time.perf_counter()
            logger.close("completed")
            close_s[name] = time.perf_counter() - t0
        naive.set_terminated(naive_run)
    finally:
        proxy.shutdown()
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()

    base = statistics.median(step_times["plain"])
    print(f"\n{args.rounds} rounds x {args.steps} steps per mode (naive-sync: {args.naive_steps}), "
          f"log every step, {len(modes)} modes interleaved")
    print(f"{'mode':14s} {'median step':>12s} {'mean step':>10s} {'vs plain':>9s} {'log() median':>13s} "
          f"{'log() p99':>10s} {'close()':>8s}")
    for mode, times in step_times.items():
        med, mean = statistics.median(times), statistics.fmean(times)
        lt = sorted(log_times[mode])
        log_med = f"{statistics.median(lt) * 1e6:.1f} us" if lt else "-"
        log_p99 = f"{lt[int(0.99 * (len(lt) - 1))] * 1e6:.0f} us" if lt else "-"
        close = f"{close_s[mode]:.2f} s" if mode in close_s else "-"
        print(f"{mode:14s} {med * 1e3:9.3f} ms {mean * 1e3:7.3f} ms {100 * (med / base - 1):+8.1f}% {log_med:>13s} "
              f"{log_p99:>10s} {close:>8s}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
