"""logging.tensorboard.enabled: rank 0 writes the logged scalars to <run.dir>/tensorboard, read back
with TensorBoard's own event reader."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from dist_train.config import load_config
from dist_train.logging.metrics import MetricLogger, NullMetricLogger, build_metric_logger
from dist_train.logging.tensorboard import TensorBoardSink
from tests.conftest import read_metrics, read_summary, run_cli


def scalars(log_dir: Path) -> dict:
    """``{tag: {step: value}}`` from every event file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def loss_steps(run: Path) -> list:
    """The steps of the ``loss`` points, from the event files in the order written, read as
    TensorBoard reads a restart: a SessionLog START at step S (a resumed run's purge mark) drops
    the earlier points at S and after."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    steps: list = []
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < event.step]
            elif event.HasField("summary") and any(v.tag == "loss" for v in event.summary.value):
                steps.append(event.step)
    return steps


def test_sink_writes_numbers_and_skips_the_rest(tmp_path):
    sink = TensorBoardSink(str(tmp_path))
    sink.log(1, {"loss": 2.5, "lr": 1e-3, "note": "text", "flag": True, "missing": None, "big": 7})
    sink.log(2, {"loss": float("inf")})
    sink.close("completed")
    got = scalars(tmp_path / "tensorboard")
    assert set(got) == {"loss", "lr", "big"}
    assert got["loss"][1] == 2.5 and math.isinf(got["loss"][2]) and got["big"] == {1: 7.0}
    assert math.isclose(got["lr"][1], 1e-3, rel_tol=1e-6)


def test_build_metric_logger_attaches_the_sink_on_rank0_only(tmp_path):
    cfg = load_config(None, ["logging.tensorboard.enabled=true"]).logging
    logger = build_metric_logger(str(tmp_path), True, None, cfg.tensorboard)
    assert isinstance(logger, MetricLogger) and [type(s) for s in logger.sinks] == [TensorBoardSink]
    logger.log(3, {"loss": 1.0})
    logger.close("completed")
    assert scalars(tmp_path / "tensorboard") == {"loss": {3: 1.0}}
    assert isinstance(build_metric_logger(str(tmp_path / "r1"), False, None, cfg.tensorboard), NullMetricLogger)
    assert not (tmp_path / "r1").exists()
    off = build_metric_logger(str(tmp_path / "off"), True, None, load_config(None, []).logging.tensorboard)
    assert off.sinks == []
    off.close()


@pytest.mark.slow
def test_a_run_writes_the_same_scalars_as_metrics_jsonl_and_mlflow(tmp_path, ok):
    """End to end: TensorBoard's scalars are metrics.jsonl's, step by step, and MLflow (its store
    named by MLFLOW_TRACKING_URI, the config key left empty) holds the same values."""
    run, store = tmp_path / "run", tmp_path / "elsewhere" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    ok(run_cli(["model.name=mlp", "data.name=digits", "model.hidden=32", "data.batch_size=32", "train.max_steps=4",
                "logging.every_steps=1", "eval.every_steps=2", "eval.max_batches=1", "data.num_workers=0",
                "logging.progress_bar=off", "logging.tensorboard.enabled=true", f"run.dir={run}"],
               env={"MLFLOW_TRACKING_URI": uri}, timeout=300))
    got = scalars(run / "tensorboard")
    for tag in ("loss", "lr", "grad_norm", "samples_per_s", "eval_loss", "eval_accuracy"):
        assert tag in got, sorted(got)
    records = read_metrics(run)
    assert sorted(got["loss"]) == [1, 2, 3, 4] and sorted(got["eval_loss"]) == [2, 4]
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isclose(got[key][record["step"]], value, rel_tol=1e-6), (key, record["step"])

    # MLflow used the store from the environment, not the run dir's embedded one.
    assert not (run / "mlflow.db").exists() and store.is_file()
    from mlflow.tracking import MlflowClient

    run_id = read_summary(run)["mlflow_run_id"]
    history = {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, "loss")}
    assert history.keys() == got["loss"].keys()
    assert all(math.isclose(history[s], got["loss"][s], rel_tol=1e-6) for s in history)


def test_a_crashed_and_resumed_run_logs_each_step_once_to_tensorboard_and_mlflow(tmp_path, ok):
    """The run crashes at step 7 (checkpoint at 5) and is started again: it trains steps 6-7 again.
    metrics.jsonl was cut back, but TensorBoard and MLflow showed steps 6 and 7 twice."""
    from mlflow.tracking import MlflowClient

    run, store = tmp_path / "run", tmp_path / "mlflow.db"
    uri = f"sqlite:///{store}"
    args = ["model.name=mlp", "data.name=digits", "model.hidden=32", "data.batch_size=32", "train.max_steps=10",
            "logging.every_steps=1", "eval.every_steps=0", "eval.max_batches=1", "data.num_workers=0",
            "checkpoint.every_steps=5", "logging.progress_bar=off", "logging.tensorboard.enabled=true",
            f"logging.mlflow.tracking_uri={uri}", f"run.dir={run}"]
    crashed = run_cli([*args, "debug.faults=crash@7"], timeout=300)
    assert crashed.returncode not in (0, 2), crashed.stderr[-2000:]
    ok(run_cli(args, timeout=300))
    assert loss_steps(run) == list(range(1, 11))
    history = MlflowClient(uri).get_metric_history(read_summary(run)["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 11))


def test_a_run_restarted_before_its_first_checkpoint_logs_each_step_once(tmp_path, ok):
    """An attempt that crashed before any checkpoint wrote points 1-6; the rerun starts at step 0:
    its purge mark dropped nothing (it was set only when resuming from a step > 0)."""
    run = tmp_path / "run"
    args = ["model.name=mlp", "data.name=digits", "model.hidden=16", "train.max_steps=8", "logging.every_steps=1",
            "eval.every_steps=0", "eval.max_batches=1", "data.num_workers=0", "logging.progress_bar=off",
            "logging.tensorboard.enabled=true", "logging.mlflow.enabled=false", f"run.dir={run}"]
    crashed = run_cli([*args, "debug.faults=crash@7"], timeout=300)
    assert crashed.returncode not in (0, 2), crashed.stderr[-2000:]
    ok(run_cli(args, timeout=300))
    assert loss_steps(run) == list(range(1, 9))
    fresh = tmp_path / "fresh"  # (a first attempt has no earlier events: no purge mark, one file)
    ok(run_cli([*args[:-1], f"run.dir={fresh}"], timeout=300))
    assert len(list((fresh / "tensorboard").glob("events.out.tfevents.*"))) == 1
