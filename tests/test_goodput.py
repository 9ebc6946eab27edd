"""The step-time breakdown adds up, and goodput counts the work a failure cost."""
from __future__ import annotations

import statistics

import pytest

from conftest import ok, read_metrics, read_summary, run_cli  # noqa: F401

BASE = ["model.name=mlp", "data.name=digits", "data.batch_size=16", "data.num_workers=0", "train.warmup_steps=0",
        "logging.every_steps=1", "logging.mlflow.enabled=false", "logging.progress_bar=off", "eval.max_batches=1"]


def test_the_breakdown_adds_up_to_the_step_time(tmp_path, ok):
    run = tmp_path / "run"
    ok(run_cli([*BASE, "train.max_steps=12", "checkpoint.resume=never", f"run.dir={run}"]))
    records = [r for r in read_metrics(run) if "loss" in r]
    phases = ("data", "forward_backward", "optimizer", "checkpoint", "evaluation", "other")
    for r in records:
        assert all(f"time/{p}_s" in r for p in phases) and 0 <= r["data_wait_pct"] <= 100
        assert abs(sum(r[f"time/{p}_s"] for p in phases) - r["time/iteration_s"]) < 1e-6
    # Inside the optimizer step: data + forward/backward + optimizer is the step time (5%).
    ratios = [(r["time/data_s"] + r["time/forward_backward_s"] + r["time/optimizer_s"]) / r["step_time_s"]
              for r in records[2:]]
    assert 0.95 <= statistics.median(ratios) <= 1.05, ratios
    g = read_summary(run)["goodput"]
    assert g["attempts"] == 1 and g["lost_steps"] == 0 and 0 < g["goodput"] < 1
    assert g["productive_s"] <= g["total_s"]


@pytest.mark.slow
def test_lost_work_is_the_steps_between_the_last_checkpoint_and_the_failure(tmp_path):
    run = tmp_path / "run"
    args = [*BASE, "train.max_steps=12", "checkpoint.every_steps=5", "strategy.name=ddp", f"run.dir={run}"]
    crashed = run_cli([*args, "debug.faults=crash@8"], nproc=2)
    assert crashed.returncode != 0
    again = run_cli(args, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    s = read_summary(run)
    assert s["resumed_from_step"] == 5 and s["steps"] == 12
    g = s["goodput"]
    assert g["attempts"] == 2 and g["lost_steps"] == 3, g  # steps 6, 7, 8 were trained twice
    assert g["lost_s"] > 0 and g["restart_downtime_s"] >= 0 and 0 < g["goodput"] < 1
    assert "goodput" in again.stderr
