"""The step-time breakdown adds up, and goodput counts the work a failure cost."""
from __future__ import annotations

import json
import logging
import statistics
import time

import pytest
import torch

from conftest import ok, read_metrics, read_summary, run_cli  # noqa: F401
from dist_train.train.phases import PHASES, PhaseClock

BASE = ["model.name=mlp", "data.name=digits", "data.batch_size=16", "data.num_workers=0", "train.warmup_steps=0",
        "logging.every_steps=1", "logging.mlflow.enabled=false", "logging.progress_bar=off", "eval.max_batches=1"]


def test_the_breakdown_adds_up_to_the_step_time(tmp_path, ok):
    run = tmp_path / "run"
    ok(run_cli([*BASE, "train.max_steps=12", "checkpoint.resume=never", "checkpoint.every_steps=3",
                "eval.every_steps=4", f"run.dir={run}"]))
    records = [r for r in read_metrics(run) if "loss" in r]
    phases = ("data", "forward_backward", "optimizer", "checkpoint", "evaluation", "other")
    for r in records:
        assert all(f"time/{p}_s" in r for p in phases) and 0 <= r["data_wait_pct"] <= 100
        assert abs(sum(r[f"time/{p}_s"] for p in phases) - r["time/iteration_s"]) < 1e-6
    # A step's evaluation is in its own record; its save, made after the record is written (a
    # committed checkpoint never lacks its step's record), is in the next one's.
    by_step = {r["step"]: r for r in records}
    saves = [by_step[s]["time/checkpoint_s"] for s in (4, 7, 10)]
    others = [r["time/checkpoint_s"] for s, r in by_step.items() if s not in (4, 7, 10)]
    assert min(saves) > max(others), (saves, others)
    evals = [by_step[s]["time/evaluation_s"] for s in (4, 8)]
    assert min(evals) > max(r["time/evaluation_s"] for s, r in by_step.items() if s % 4), evals
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


def test_a_failed_attempt_keeps_its_time_in_the_ledger(tmp_path):
    """A run that fails with an error (here train.nonfinite=abort) writes its attempt's phases to
    goodput.json and its goodput to summary.json, though it ends between the ledger's periodic
    writes (every 2 s); the next attempt counts that time."""
    run = tmp_path / "run"
    args = [*BASE, "train.max_steps=10", "checkpoint.every_steps=4", f"run.dir={run}"]
    failed = run_cli([*args, "debug.faults=nan@7", "train.nonfinite=abort"])
    assert failed.returncode not in (0, 2), failed.stderr[-2000:]
    s = read_summary(run)
    assert s["status"] == "failed" and s["goodput"]["attempts"] == 1, s
    attempt = json.loads((run / "goodput.json").read_text())["attempts"][0]
    assert attempt["reached"] == s["steps"] == 7 and attempt["phases"]["forward_backward"] > 0, attempt
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    g = read_summary(run)["goodput"]
    # (abort checkpointed the last good weights, at step 7: nothing is recomputed)
    assert g["attempts"] == 2 and g["lost_steps"] == 0 and read_summary(run)["resumed_from_step"] == 7, g
    assert g["productive_s"] >= round(attempt["phases"]["forward_backward"] + attempt["phases"]["optimizer"], 3), g


def test_the_clock_resets_to_the_loop():
    """summary.json's time_breakdown starts with the loop: start-up before it (a resume's load,
    MLflow's start) is goodput's startup_s, not the breakdown's "other"."""
    clock = PhaseClock()
    with clock("checkpoint"):
        pass
    clock.take()
    assert clock.totals
    clock.reset()
    assert not clock.totals and not clock.window
    assert set(clock.take()) == set(PHASES)


class _Clock:
    """A phase clock whose windows the test writes (seconds per phase)."""

    def __init__(self):
        self.window = {}

    def take(self):
        out = {p: self.window.get(p, 0.0) for p in PHASES}
        self.window = {}
        return out


def _reporter(clock, every):
    from types import SimpleNamespace

    from dist_train.train.reporting import Reporter

    strategy = SimpleNamespace(lr=0.1, device=torch.device("cpu"))
    metrics = SimpleNamespace(log=lambda step, values: None)
    progress = SimpleNamespace(update=lambda step, last: None)
    return Reporter(strategy, metrics, progress, every=every, max_steps=100, global_batch=8, clock=clock)


def _steps(reporter, clock, first, last, data_s, other_s=0.0):
    from types import SimpleNamespace

    output = SimpleNamespace(result=SimpleNamespace(skipped=False, grad_norm=torch.tensor(1.0), grad_norms=None,
                                                    loss_scale=None), loss=torch.tensor(2.0), metrics={}, lr=0.1)
    for step in range(first, last + 1):
        for phase, s in (("data", data_s), ("forward_backward", 0.09), ("optimizer", 0.01), ("other", other_s)):
            clock.window[phase] = clock.window.get(phase, 0.0) + s
        reporter.maybe_log(SimpleNamespace(step=step, epoch=0, samples_seen=8 * step, skipped_steps=0), output, 0.1 + data_s)


def test_the_data_wait_warning_leaves_out_the_first_steps(caplog):
    """The first steps of a process wait for DataLoader workers to start: the record shows it,
    the warning judges the steps after them."""
    clock = _Clock()
    reporter = _reporter(clock, every=10)
    with caplog.at_level(logging.WARNING, logger="dist_train"):
        _steps(reporter, clock, 1, 1, data_s=1.0)      # worker start-up
        _steps(reporter, clock, 2, 10, data_s=0.005)   # 5% of a steady step
    assert reporter.last["data_wait_pct"] > 10 and "waiting for data" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="dist_train"):
        _steps(reporter, clock, 11, 20, data_s=0.05)   # 33%: a real data bottleneck
    assert "step 20: waiting for data takes 33%" in caplog.text


def test_a_window_of_warmup_steps_only_never_warns(caplog):
    clock = _Clock()
    reporter = _reporter(clock, every=1)
    with caplog.at_level(logging.WARNING, logger="dist_train"):
        _steps(reporter, clock, 1, 5, data_s=1.0)
    assert "waiting for data" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="dist_train"):
        _steps(reporter, clock, 6, 6, data_s=1.0)
    assert "step 6: waiting for data" in caplog.text


def test_one_record_per_logged_step_with_the_evaluations_in_it(tmp_path):
    """metrics.jsonl holds one JSON object per logged step ({"step", "loss", "lr", ...}): an
    evaluation joins its step's record (a step that is evaluated is logged, due or not); the final
    one, made after the last step's record and save, is added to that record, and so is a rerun's
    evaluation of the step an earlier attempt ended with."""
    from types import SimpleNamespace

    from dist_train.logging.metrics import MetricLogger
    from dist_train.train.reporting import Reporter

    path = tmp_path / "metrics.jsonl"
    strategy = SimpleNamespace(lr=0.1, device=torch.device("cpu"))
    progress = SimpleNamespace(update=lambda step, last: None, message=lambda text: None)
    output = SimpleNamespace(result=SimpleNamespace(skipped=False, grad_norm=torch.tensor(1.0), grad_norms=None,
                                                    loss_scale=None), loss=torch.tensor(2.0), metrics={}, lr=0.1)
    logger = MetricLogger(str(path))
    logger.start({}, {})
    reporter = Reporter(strategy, logger, progress, every=4, max_steps=10, global_batch=8, clock=_Clock())
    for step in range(1, 11):
        if step in (3, 8):  # the loop evaluates before it records the step
            reporter.log_eval(step, {"eval_loss": step / 10})
        reporter.maybe_log(SimpleNamespace(step=step, epoch=0, samples_seen=8 * step, skipped_steps=0), output, 0.1)
    reporter.log_eval(10, {"eval_loss": 1.0}, final=True)  # the final evaluation, after the last save
    logger.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [3, 4, 8, 10]
    assert all(r["loss"] == 2.0 and "lr" in r for r in records)
    assert {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r} == {3: 0.3, 8: 0.8, 10: 1.0}

    # A rerun that trains no step (resumed at the last one) and evaluates it: the same one record.
    logger = MetricLogger(str(path))
    logger.start({}, {}, resume_step=10)
    reporter = Reporter(strategy, logger, progress, every=4, max_steps=10, global_batch=8, clock=_Clock(),
                        start_step=10)
    reporter.log_eval(10, {"eval_loss": 0.9, "eval_accuracy": 0.5}, final=True)
    logger.log(11, {"loss": 1.0})  # (the file is appended to as before)
    logger.close()
    again = read_metrics(tmp_path)
    assert again[:3] == records[:3] and [r["step"] for r in again] == [3, 4, 8, 10, 11]
    assert again[3] == {**records[3], "eval_loss": 0.9, "eval_accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_throughput_counts_the_loops_logging_time(tmp_path, monkeypatch):
    """samples_per_s counts the loop's whole time per step but evaluation and saves: a step's
    logging (the loss all-reduce, the write) is in the next step's busy time, as in a user's loop."""
    from dist_train.config import load_config
    from dist_train.env.cluster import detect
    from dist_train.train import reporting
    from dist_train.train.job import run_job

    busy, original = [], reporting.Reporter.maybe_log

    def slow_log(self, state, output, step_s, busy_s=None):
        busy.append(busy_s)
        time.sleep(0.05)  # a slow logging step
        return original(self, state, output, step_s, busy_s)

    monkeypatch.setattr(reporting.Reporter, "maybe_log", slow_log)
    job = load_config(None, [*BASE, "train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.resume=never",
                             f"run.dir={tmp_path}"])
    assert run_job(job, detect()) == 0
    assert len(busy) == 6 and all(b >= 0.05 for b in busy[1:]), busy  # (the saves are not counted)


def test_only_an_attempt_that_did_not_complete_the_run_makes_the_next_one_a_restart(tmp_path):
    """Restart downtime is the gap after a killed, failed or preempted attempt. After an attempt that
    completed the run, the next one launched anew (a rerun of the finished run, or one with a higher
    train.max_steps) restarts nothing: the hour between them is not the run's downtime."""
    from dist_train.train.goodput import GoodputLedger

    clock = PhaseClock()
    clock.totals.update(forward_backward=2.0, optimizer=1.0)
    gap = 3600.0

    def attempt(run, resumed_from, reached, completed, started, relaunched=False):
        ledger = GoodputLedger(str(run), enabled=True, started_unix=started)
        ledger.begin(resumed_from, startup_s=1.0, relaunched=relaunched)
        return ledger, ledger.finish(reached, clock, completed=completed)

    # A launcher's restart after a completed attempt: an attempt in between failed (before its first
    # record: at start-up), so the gap is downtime.
    for completed, relaunched, expected in ((True, False, 0.0), (False, False, gap), (True, True, gap)):
        run = tmp_path / f"completed-{completed}-{relaunched}"
        run.mkdir()
        attempt(run, 0, 10, completed, started=time.time() - 5)
        ledger, g = attempt(run, 10, 20, True, started=time.time() + gap, relaunched=relaunched)
        assert g["attempts"] == 2 and g["restart_downtime_s"] == pytest.approx(expected, abs=1.0), (completed, g)
        assert ledger.current["downtime_s"] == pytest.approx(expected, abs=1.0)
    # A ledger from before the field existed counts the gap, as it always did.
    run = tmp_path / "old"
    run.mkdir()
    attempt(run, 0, 10, True, started=time.time() - 5)
    record = json.loads((run / "goodput.json").read_text())
    del record["attempts"][0]["completed"]
    (run / "goodput.json").write_text(json.dumps(record))
    _, g = attempt(run, 10, 20, True, started=time.time() + gap)
    assert g["restart_downtime_s"] == pytest.approx(gap, abs=1.0)
