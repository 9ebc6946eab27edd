"""MLflow tracking on rank 0: the embedded store, resume into the same run, never blocking.

The tests read everything back with MlflowClient and compare it with metrics.jsonl, which holds
every metric by construction. A real tracking server (and an outage of it) is in
test_mlflow_server.py.
"""
from __future__ import annotations

import io
import json
import math
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, ok, read_metrics, read_summary, run_cli  # noqa: F401  (ok is a fixture)
from dist_train.config.load import flatten
from dist_train.logging import mlflow_writer as mw
from dist_train.logging.mlflow_buffer import MetricBuffer, sanitize_name
from dist_train.logging.metrics import MetricLogger, build_metric_logger

COMMON = ["data.name=digits", "model.name=mlp", "data.num_workers=0", "logging.progress_bar=off",
          "train.warmup_steps=2"]


# --- helpers --------------------------------------------------------------------------------


def only_run(uri: str):
    """The one run of the store (any experiment), and a client on it."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, f"expected exactly one MLflow run, found {[r.info.run_id for r in runs]}"
    return client, runs[0]


def expected_series(records):
    """``{metric: {step: value}}`` of every number in metrics.jsonl."""
    out = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert r["step"] not in out.setdefault(key, {}), f"{key} logged twice at step {r['step']}"
                out[key][r["step"]] = float(value)
    return out


def assert_same_series(client, run, records) -> None:
    """Every metric series of the run equals metrics.jsonl: same names, same steps, same values."""
    expected = expected_series(records)
    assert set(run.data.metrics) == set(expected)
    for key, by_step in expected.items():
        history = client.get_metric_history(run.info.run_id, key)
        got = {m.step: m.value for m in history}
        assert len(history) == len(got), f"{key}: a step logged twice in MLflow"
        assert got.keys() == by_step.keys(), f"{key}: steps differ: {sorted(got)} vs {sorted(by_step)}"
        for step, value in by_step.items():
            assert got[step] == pytest.approx(value, rel=1e-12, abs=1e-12), f"{key} at step {step}"


def artifact_paths(client, run_id: str, path: str = "") -> set:
    out = set()
    for a in client.list_artifacts(run_id, path or None):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def assert_artifacts(client, run, run_dir: Path, extra=()) -> None:
    paths = artifact_paths(client, run.info.run_id)
    assert {"config.yaml", "summary.json", "plots/loss.png", *extra} <= paths, paths
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(run_dir / "_dl")))
    assert json.loads(local.read_text()) == read_summary(run_dir)
    png = Path(client.download_artifacts(run.info.run_id, "plots/loss.png", str(run_dir / "_dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def sqlite_uri(run_dir: Path) -> str:
    return f"sqlite:///{run_dir.resolve()}/mlflow.db"


# --- pure pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,want", [
    ("loss", "loss"), ("eval/loss", "eval/loss"), ("a:b", "a_b"), ("a\u00e9b", "a\u00e9b"), ("x=1,y", "x_1_y"),
    ("/abs//x/../y", "abs/x/y"), ("./", "_"), ("", "_"), ("a" * 300, "a" * 250),
])
def test_metric_names_are_sanitized(name, want):
    assert sanitize_name(name) == want
    from mlflow.utils.validation import _validate_metric_name

    _validate_metric_name(sanitize_name(name))  # MLflow accepts it


def test_buffer_is_bounded_and_counts_what_it_drops():
    buf = MetricBuffer(capacity=10)
    for step in range(1, 5):
        buf.add(step, 1000 + step, {"loss": 1.0 / step, "lr": 0.1, "note": "text", "flag": True, "nan": math.nan})
    # 3 numbers per step (NaN is one; text and bools are not) -> 12 offered, 10 kept, 2 dropped.
    assert len(buf) == 10 and buf.dropped == 2
    assert buf.peek(3) == [("loss", 1.0, 1001, 1), ("lr", 0.1, 1001, 1), ("nan", buf.peek(3)[2][1], 1001, 1)]
    buf.pop(9)
    assert [row[3] for row in buf.peek(10)] == [4]


def test_metric_logger_fans_out_and_jsonl_keeps_nonfinite(tmp_path):
    got = []
    sink = SimpleNamespace(log=lambda step, values: got.append((step, values)), close=lambda status: None,
                           run_id="abc")
    logger = MetricLogger(str(tmp_path / "metrics.jsonl"), [sink])
    logger.log(3, {"loss": 0.5, "bad": math.inf, "nan": math.nan})
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 0.5, "bad": "inf", "nan": None}]
    assert got[0][0] == 3 and got[0][1]["bad"] == math.inf and math.isnan(got[0][1]["nan"])
    assert logger.run_id == "abc"
    assert build_metric_logger(str(tmp_path), is_rank0=False).run_id is None


@pytest.mark.parametrize("override,key", [
    ("logging.mlflow.tracking_uri=https://alice:secret@mlflow.example.com", "logging.mlflow.tracking_uri"),
    ("logging.mlflow.flush_timeout_s=0", "logging.mlflow.flush_timeout_s"),
    ("logging.mlflow.experiment=' '", "logging.mlflow.experiment"),
])
def test_bad_mlflow_config_names_the_key(override, key):
    from dist_train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key
    assert load_config(None, ["logging.mlflow.tracking_uri=http://mlflow.example.com:5000"])


# --- the writer, in process, on a SQLite store ----------------------------------------------


def run_writer(tmp_path: Path, messages, **opts):
    emitted = []
    options = dict(tracking_uri=sqlite_uri(tmp_path), experiment="t", artifact_location=str(tmp_path / "art"),
                   flush_timeout_s=10, parent_pid=os.getppid())
    options.update(opts)
    writer = mw.Writer(options, emitted.append)
    writer.read(io.StringIO("".join(json.dumps(m) + "\n" for m in messages)))
    writer.run()
    return emitted


def start(params=None, resume=None):
    return {"t": "start", "params": params or {"a": 1}, "tags": {"mlflow.runName": "r", "strategy": "ddp"},
            "resume_run_id": resume}


def test_writer_resumes_the_same_run_and_records_changed_params(tmp_path, caplog):
    first = run_writer(tmp_path, [start({"a": 1, "b": 2}), {"t": "m", "step": 1, "ts": 1, "v": {"loss": 3.0}},
                                  {"t": "close", "status": "preempted", "artifacts": []}])
    run_id = first[0]["run_id"]
    assert first[-1]["status"] == "KILLED" and first[-1]["terminated"] and first[-1]["unsent"] == 0
    second = run_writer(tmp_path, [start({"a": 1, "b": 3, "c": 4}, resume=run_id),
                                   {"t": "m", "step": 2, "ts": 2, "v": {"loss": 2.0}},
                                   {"t": "close", "status": "completed", "artifacts": []}])
    assert second[0]["run_id"] == run_id
    client, run = only_run(sqlite_uri(tmp_path))
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params == {"a": "1", "b": "2", "c": "4"}  # params are immutable in MLflow
    assert run.data.tags["dist_train.changed_params"] == "b: 2 -> 3"
    assert run.data.tags["dist_train.attempts"] == "2"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 3.0), (2, 2.0)]


def test_a_resume_with_denser_logging_sends_the_new_steps_and_none_twice(tmp_path):
    """An attempt logged steps 4 and 8 (every 4) and died after its checkpoint of step 4; the rerun
    logs every 2 from there. Steps 6 and 10 are new to the run, step 8 it has: the run skipped every
    point up to the latest step it held (6 never reached MLflow)."""
    def m(step, loss):
        return {"t": "m", "step": step, "ts": step, "v": {"loss": loss}}

    first = run_writer(tmp_path, [start(), m(4, 4.0), m(8, 8.0)])  # (EOF without close: died)
    run_id = first[0]["run_id"]
    again = {**start(resume=run_id), "resume_step": 4}
    run_writer(tmp_path, [again, m(6, 6.0), m(8, 8.0), m(10, 10.0), {"t": "close", "status": "completed", "artifacts": []}])
    client, _ = only_run(sqlite_uri(tmp_path))
    assert [(p.step, p.value) for p in client.get_metric_history(run_id, "loss")] == [
        (4, 4.0), (6, 6.0), (8, 8.0), (10, 10.0)]


def test_writer_starts_a_new_run_when_the_resumed_one_is_not_in_the_store(tmp_path, caplog):
    emitted = run_writer(tmp_path, [start(resume="0123456789abcdef0123456789abcdef"),
                                    {"t": "close", "status": "completed", "artifacts": []}])
    assert emitted[0]["run_id"] != "0123456789abcdef0123456789abcdef"
    _, run = only_run(sqlite_uri(tmp_path))
    assert run.info.run_id == emitted[0]["run_id"] and run.data.tags["dist_train.attempts"] == "1"
    assert any("is not in" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_writer_marks_the_run_failed_when_the_trainer_dies_without_closing(tmp_path, caplog):
    (tmp_path / "config.yaml").write_text("run: {}\n")
    emitted = run_writer(tmp_path, [start(), {"t": "m", "step": 7, "ts": 7, "v": {"loss": 1.5, "bad name!": 2}}],
                         artifacts=[[str(tmp_path / "config.yaml"), ""]])  # EOF, no close: rank 0 died
    client, run = only_run(sqlite_uri(tmp_path))
    assert emitted[-1]["status"] == "FAILED" and run.info.status == "FAILED"
    assert run.data.metrics == {"loss": 1.5, "bad name_": 2.0}  # sanitized, and still sent
    assert artifact_paths(client, run.info.run_id) == {"config.yaml"}
    assert any("without closing" in r.getMessage() for r in caplog.records)


# --- the sink and its writer process, with no server ----------------------------------------


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections are refused


@pytest.mark.parametrize("server", ["refused", "hung"])
def test_no_server_never_blocks_training_and_exit_is_bounded(tmp_path, caplog, capfd, server):
    """Refused: connections fail at once. Hung: a listener that never answers (the worst case:
    every request waits for its timeout). log() stays in microseconds; start and close are bounded."""
    hung = None
    if server == "hung":
        hung = socket.socket()
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # never accepted: the kernel completes handshakes, nobody replies
        port = hung.getsockname()[1]
    else:
        port = _dead_port()
    flush = 3.0
    cfg = SimpleNamespace(enabled=True, tracking_uri=f"http://127.0.0.1:{port}", experiment="e", log_model=False,
                          flush_timeout_s=flush)
    try:
        logger = build_metric_logger(str(tmp_path), True, cfg)
        t0 = time.monotonic()
        logger.start({"a": 1}, {"strategy": "single"}, resume_run_id=None)
        start_s = time.monotonic() - t0
        costs = []
        for step in range(1, 2001):
            t = time.perf_counter()
            logger.log(step, {"loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5})
            costs.append(time.perf_counter() - t)
        err, deadline = "", time.monotonic() + 60  # the writer tried, failed, and said so once
        while "is unreachable" not in err and time.monotonic() < deadline:
            time.sleep(0.1)
            err += capfd.readouterr().err
        t0 = time.monotonic()
        logger.close("completed")
        close_s = time.monotonic() - t0
    finally:
        if hung is not None:
            hung.close()
    # The writer may need seconds to import mlflow before it answers: start waits at most `flush`.
    assert start_s < flush + 2, start_s
    assert statistics.median(costs) < 200e-6, f"median log() {statistics.median(costs) * 1e6:.0f} us"
    assert close_s < flush + 3 + 2, close_s  # flush_timeout_s + CLOSE_GRACE_S + slack
    assert len(read_metrics(tmp_path)) == 2000  # metrics.jsonl has everything regardless
    # One warning from the writer (its stderr is ours), and the final count from the sink.
    err += capfd.readouterr().err
    assert err.count("is unreachable") == 1, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("6000 metric values not sent" in w for w in warnings), warnings


# --- end to end: the real CLI, the embedded store -------------------------------------------


def test_two_rank_job_logs_one_run_to_the_embedded_store(tmp_path, ok):
    run_dir = tmp_path / "run"
    ok(run_cli([*COMMON, f"run.dir={run_dir}", "train.max_steps=12", "logging.every_steps=2", "eval.every_steps=6",
                "checkpoint.resume=never", "logging.mlflow.log_model=true", "run.name=emb"], nproc=2, timeout=300))
    client, run = only_run(sqlite_uri(run_dir))  # the default: sqlite:///<run.dir>/mlflow.db
    summary = read_summary(run_dir)
    assert summary["mlflow_run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "emb"
    assert run.info.artifact_uri.startswith(str((run_dir / "mlartifacts").resolve()))
    # params: the flattened resolved config
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run.data.params == {k: str(v) for k, v in flatten(config)}
    # tags
    tags = run.data.tags
    assert tags["strategy"] == "ddp" and tags["world_size"] == "2" and tags["num_nodes"] == "1"
    assert tags["precision"] == "fp32" and tags["hosts"] == socket.gethostname()
    import torch

    assert tags["torch_version"] == torch.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    # metrics: every series with its steps, as in metrics.jsonl
    records = read_metrics(run_dir)
    assert_same_series(client, run, records)
    assert {"loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "memory_rss_mib", "eval_loss",
            "eval_accuracy"} <= set(run.data.metrics)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(2, 13, 2))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")) == [6, 12]
    # artifacts, including the exported weights
    assert_artifacts(client, run, run_dir, extra=["model/model.safetensors"])
    from safetensors.torch import load_file

    weights = load_file(client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path / "w")))
    assert {"hidden1.linear.weight", "out.bias"} <= set(weights)


def test_resumed_job_continues_the_same_run(tmp_path, ok):
    run_dir = tmp_path / "run"
    args = [*COMMON, f"run.dir={run_dir}", "logging.every_steps=5", "checkpoint.every_steps=10"]
    ok(run_cli([*args, "train.max_steps=20"]))
    first = read_summary(run_dir)
    assert first["mlflow_run_id"]
    ok(run_cli([*args, "train.max_steps=40"]))
    second = read_summary(run_dir)
    assert second["resumed_from_step"] == 20
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    client, run = only_run(sqlite_uri(run_dir))
    assert run.info.run_id == first["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["dist_train.attempts"] == "2"
    assert "train.max_steps: 20 -> 40" in run.data.tags["dist_train.changed_params"]
    # the step axis continues: each step once, the first attempt's and the second's
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(5, 41, 5))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")) == [20, 40]
    assert_same_series(client, run, read_metrics(run_dir))


def test_a_job_started_from_another_runs_checkpoint_gets_its_own_run(tmp_path, ok):
    """checkpoint.resume=<another run dir's checkpoint> with a shared store: the new job's points
    went into the other job's MLflow run (and those up to its last step were skipped there)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{(tmp_path / 'shared.db').resolve()}"
    base = [*COMMON, f"logging.mlflow.tracking_uri={uri}", "logging.every_steps=5"]
    ok(run_cli([*base, f"run.dir={tmp_path / 'a'}", "train.max_steps=10"]))
    ok(run_cli([*base, f"run.dir={tmp_path / 'b'}", "train.max_steps=20",
                f"checkpoint.resume={tmp_path / 'a' / 'checkpoints' / 'step_00000010'}"]))
    a, b = read_summary(tmp_path / "a"), read_summary(tmp_path / "b")
    assert b["resumed_from_step"] == 10 and a["mlflow_run_id"] != b["mlflow_run_id"], (a, b)
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(a["mlflow_run_id"], "loss")) == [5, 10]
    assert sorted(m.step for m in client.get_metric_history(b["mlflow_run_id"], "loss")) == [15, 20]
