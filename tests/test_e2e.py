"""End-to-end: the commands a user types, as real subprocesses."""
from __future__ import annotations

import os
import sys

import pytest
import yaml

from conftest import REPO, read_metrics, read_summary, run_cli

FMNIST = "/usr/share/datasets/fashion-mnist"
QUICK = ["checkpoint.resume=never", "logging.mlflow.enabled=false"]


@pytest.mark.slow
def test_torchrun_two_ranks_ddp_learns_digits(tmp_path, ok):
    run = tmp_path / "ddp"
    proc = ok(run_cli(["data.name=digits", "data.batch_size=32", "train.max_steps=120", "train.lr=0.003",
                       "eval.every_steps=60", "logging.every_steps=20", f"run.dir={run}", *QUICK], nproc=2))
    s = read_summary(run)
    assert s["status"] == "completed" and s["world_size"] == 2 and s["strategy"] == "ddp"
    assert s["steps"] == 120 and s["samples_seen"] == 120 * 2 * 32
    assert s["eval_accuracy"] > 0.8, s           # chance is 0.1
    assert s["samples_per_s"] > 0 and s["wall_s"] > 0 and s["resumed_from_step"] is None
    for key in ("precision", "train_loss", "eval_loss", "mlflow_run_id"):
        assert key in s
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 120 and cfg["data"]["name"] == "digits"
    records = read_metrics(run)
    assert [r["step"] for r in records if "loss" in r] == list(range(20, 121, 20))
    assert all({"loss", "lr", "grad_norm", "samples_per_s"} <= set(r) for r in records if "loss" in r)
    assert [r["step"] for r in records if "eval_loss" in r] == [60, 120]
    assert [r["step"] for r in records] == list(range(20, 121, 20))  # one object per logged step
    # Progress lines on rank 0 only (not a terminal here), errors none.
    assert "step 120/120" in proc.stderr and "[rank1] INFO" not in proc.stderr


@pytest.mark.slow
def test_single_process_debug_preset(tmp_path, ok):
    run = tmp_path / "dbg"
    ok(run_cli(["--config", "configs/debug.yaml", f"run.dir={run}", *QUICK]))
    s = read_summary(run)
    assert s["status"] == "completed" and s["strategy"] == "single" and s["world_size"] == 1
    assert s["eval_accuracy"] > 0.5


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Debian dataset-fashion-mnist not installed (make setup installs it)")
def test_default_job_on_fashion_mnist_short(tmp_path, ok):
    """The default config, shortened: 2 ranks on the real Fashion-MNIST learn quickly."""
    run = tmp_path / "fm"
    ok(run_cli(["train.max_steps=150", "train.warmup_steps=10", f"run.dir={run}", *QUICK], nproc=2))
    s = read_summary(run)
    assert s["dataset"] == "fashion_mnist" and s["model"] == "cnn"
    assert s["eval_accuracy"] > 0.7, s


def test_failure_writes_summary_and_names_the_rank(tmp_path):
    """A run that fails after it started (here: a NaN loss under train.nonfinite=abort) exits 1,
    and summary.json says failed, on which rank and why. (A missing dataset folder is now a config
    error found before the run starts: exit 2, see test_config.)"""
    run = tmp_path / "bad"
    proc = run_cli(["debug.faults=nan@3", "train.nonfinite=abort", f"run.dir={run}", *QUICK], timeout=120)
    assert proc.returncode == 1, proc.stderr
    s = read_summary(run)
    assert s["status"] == "failed" and "rank 0" in s["error"] and "step 3: non-finite" in s["error"]
    assert "[rank0] ERROR" in proc.stderr
    missing = run_cli([f"data.root={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'nodata'}", *QUICK], timeout=120)
    assert missing.returncode == 2 and "data.root" in missing.stderr and "Traceback" not in missing.stderr


def test_a_survivor_of_a_dead_rank_says_another_rank_failed(tmp_path):
    """Rank 1 dies hard at step 3: rank 0's collective fails with a transport error that reads as if
    rank 0 were the culprit; its summary says another rank is gone and where to look."""
    run = tmp_path / "crash"
    proc = run_cli(["model.name=mlp", "data.name=digits", "train.max_steps=20", "debug.faults=crash@3:1",
                    "data.batch_size=16", "logging.mlflow.enabled=false", "logging.progress_bar=off",
                    f"run.dir={run}"], nproc=2, timeout=180)
    assert proc.returncode != 0
    s = read_summary(run)
    assert s["status"] == "failed" and "another rank is gone: it failed first" in s["error"], s["error"]
    # The samples of completed steps (the batch of the step that never finished was counted too).
    assert s["steps"] >= 3 and s["samples_seen"] == s["steps"] * 2 * 16, s


def test_the_summary_of_a_run_says_which_rank_failed_first_and_why(tmp_path):
    """Rank 1's task raises at its third step: rank 0's own error is only that its peer is gone;
    summary.json leads with rank 1's error (from its summary.rank1.json), then rank 0's."""
    run = tmp_path / "raised"
    proc = run_cli(["model.name=mlp", "data.name=digits", "train.max_steps=20", "task.name=plugin_pkg:fails_on_rank_1",
                    "data.batch_size=16", "logging.mlflow.enabled=false", "logging.progress_bar=off",
                    f"run.dir={run}"], nproc=2, timeout=180, cwd=REPO / "tests" / "scripts")
    assert proc.returncode != 0
    error = read_summary(run)["error"]
    assert error.startswith("rank 1: RuntimeError: the task's own error on rank 1 (then rank 0: "), error
    assert "another rank is gone" in error, error


def test_a_rerun_removes_the_failure_summaries_of_earlier_attempts(tmp_path, ok):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.rank1.json").write_text('{"status": "failed", "error": "rank 1: an earlier attempt"}')
    ok(run_cli(["model.name=mlp", "data.name=digits", "train.max_steps=2", f"run.dir={run}", *QUICK], timeout=120))
    assert read_summary(run)["status"] == "completed" and not (run / "summary.rank1.json").exists()
    # A rerun asking for fewer steps than were done trains nothing, and says so.
    proc = ok(run_cli(["model.name=mlp", "data.name=digits", "train.max_steps=1", f"run.dir={run}",
                       "logging.mlflow.enabled=false"], timeout=120))
    assert "is at step 2, past train.max_steps=1: nothing to train" in proc.stderr, proc.stderr[-2000:]
    assert read_summary(run)["steps"] == 2


def test_progress_bar_shows_each_logging_steps_metrics(capsys):
    """The bar advances every step and shows the newest logged loss (its text is rebuilt only
    when the reporter hands it a new metrics dict, at logging steps)."""
    from dist_train.logging.progress import Progress

    bar = Progress(total=4, start=0, mode="on", every=2, enabled=True)
    first, second = {"loss": 1.5, "samples_per_s": 10.0}, {"loss": 0.25, "samples_per_s": 20.0}
    bar.update(1, {})
    bar.update(2, first)
    bar.update(3, first)
    assert bar.bar.n == 3 and bar.bar.postfix == "loss=1.5000, samples/s=10"
    bar.update(4, second)
    assert bar.bar.n == 4 and bar.bar.postfix == "loss=0.2500, samples/s=20"
    bar.close()


def test_a_log_line_goes_above_the_progress_bar_not_onto_it(monkeypatch):
    """While the bar is drawn, the console writes through tqdm: the bar's frame is cleared, the line
    printed on its own, the bar drawn again below (not ``...loss=1.0000]07:20:58 WARNING ...``)."""
    import io
    import logging

    from dist_train.env.cluster import detect
    from dist_train.logging.console import setup_console
    from dist_train.logging.progress import Progress

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    restore = setup_console(detect({}), "INFO", own_process=False)
    try:
        bar = Progress(total=10, start=0, mode="on", every=1, enabled=True)
        bar.update(5, {"loss": 1.0})
        bar.bar.refresh()
        logging.getLogger("dist_train.test").warning("a checkpoint line")
        bar.close()
        logging.getLogger("dist_train.test").warning("after the bar")
    finally:
        restore()
    frames = err.getvalue().split("\r")
    line = next(f for f in frames if "a checkpoint line" in f)
    assert line.lstrip(" ").endswith("WARNING dist_train.test: a checkpoint line\n") and "%|" not in line, frames
    assert "step/s" in frames[frames.index(line) + 1], frames  # the bar, drawn again
    assert err.getvalue().endswith("WARNING dist_train.test: after the bar\n")
