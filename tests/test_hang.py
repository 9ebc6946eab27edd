"""A hang explains itself: one rank stalls; the watchdog of every rank dumps its stacks naming the
rank, step and phase before the collective timeout ends the job, which then exits non-zero with
no process left behind."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, clean_env, free_port, read_summary, spawn


def _processes_mentioning(text: str):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _torchrun(args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dist_train", *args],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_stalled_rank_is_diagnosed_and_the_job_ends_cleanly(tmp_path):
    run = tmp_path / "hang"
    args = ["model.name=mlp", "data.name=digits", "data.batch_size=16", "data.num_workers=1", "train.max_steps=30",
            "train.warmup_steps=0", "logging.every_steps=1", "logging.mlflow.enabled=false",
            "logging.progress_bar=off", "checkpoint.resume=never", "debug.faults=stall@8:1=20",
            "dist.watchdog_floor_s=2", "dist.watchdog_factor=5", "dist.timeout_s=10", f"run.dir={run}"]
    t0 = time.time()
    proc = _torchrun(args)
    assert proc.returncode != 0, proc.stderr[-3000:]
    dumps = sorted(p.name for p in (run / "hangs").iterdir())
    assert "rank00001-step00000008-data.txt" in dumps, dumps  # the stalled rank, waiting for its data
    assert any(d.startswith("rank00000-step00000008-") for d in dumps), dumps  # its peer, waiting in a collective
    text = (run / "hangs" / "rank00001-step00000008-data.txt").read_text()
    assert "rank 1, step 8, phase data" in text and "File " in text  # faulthandler's stacks
    # Its DataLoader worker (what a rank waiting for data waits on): state, and its stacks by py-spy.
    assert "--- child process " in text and "waiting in " in text, text[-3000:]
    assert "_worker_loop" in text, text[-3000:]
    assert "rank 1 seems hung: step 8 has been in phase data" in proc.stderr
    assert "rank 0 seems hung: step 8" in proc.stderr
    assert read_summary(run)["status"] == "failed"
    assert time.time() - t0 < 200
    assert _processes_mentioning(str(run)) == []  # nothing orphaned


def _rank1_never_returns(rank, world_size):
    if rank == 1:
        time.sleep(3600)  # rank 0 waits for it in the closing barrier


def test_a_hung_spawned_test_fails_with_the_ranks_stacks_and_leaves_no_rank():
    """The test harness itself: a spawned test that hangs fails in its own time, not CI's."""
    with pytest.raises(pytest.fail.Exception, match="still running after 15 s") as info:
        spawn(_rank1_never_returns, 2, timeout_s=15)
    message = str(info.value)
    assert "_rank1_never_returns on 2 spawned ranks" in message
    if "install py-spy" not in message:  # the stacks name where each rank was
        assert "_rank1_never_returns" in message.split("stacks:", 1)[1] and "barrier" in message
    time.sleep(1)
    assert not [pid for pid in _processes_mentioning("multiprocessing.spawn") if pid != os.getpid()
                and _is_child_of(pid, os.getpid())]


def _is_child_of(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == parent
    except OSError:
        return False


def test_a_long_evaluation_that_progresses_is_no_hang(tmp_path):
    """An evaluation (many batches, far longer than an iteration) reports each batch: the watchdog
    measures a stall from the last one, so only a batch that stops progressing is dumped."""
    from dist_train.train.phases import PhaseClock, Watchdog

    clock = PhaseClock()
    clock.iterations.extend([0.05] * 3)  # limit: max(floor 0.3 s, 2 x 0.05 s)
    dog = Watchdog(clock, str(tmp_path), rank=0, factor=2.0, floor_s=0.3, poll_s=0.02)
    try:
        with clock("evaluation"):
            for _ in range(40):  # 1.2 s of evaluation in 30 ms batches
                time.sleep(0.03)
                clock.progress()
            assert dog.dumps == 0 and not (tmp_path / "hangs").exists()
            time.sleep(0.6)  # a batch that never ends
            deadline = time.monotonic() + 5
            while dog.dumps == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert dog.dumps == 1, dog.dumps
        assert [p.name for p in (tmp_path / "hangs").iterdir()] == ["rank00000-step00000001-evaluation.txt"]
    finally:
        dog.close()


def test_the_watchdog_fires_before_the_collective_timeout_would_end_the_job(tmp_path):
    """Before 3 iterations the limit was 10 x the floor (1200 s by default) against a 600 s
    collective timeout: a hang in the first steps ended the job without its stacks. A checkpoint
    save is bounded by that timeout only (its time grows with the state, not with the step's)."""
    from dist_train.train.phases import PhaseClock, Watchdog

    clock = PhaseClock()
    dog = Watchdog(clock, str(tmp_path), rank=0, factor=10.0, floor_s=120.0, poll_s=60, collective_timeout_s=600.0)
    try:
        assert dog.limit() == 450.0  # (no iteration yet: 1200 s uncapped)
        clock.iterations.extend([0.1] * 3)
        assert dog.limit() == 120.0
        with clock("checkpoint"):
            assert dog.limit() == 450.0  # (a 130 s save of a large state is no hang)
        clock.iterations.extend([70.0] * 5)
        assert dog.limit() == 450.0  # (10 x 70 s uncapped)
    finally:
        dog.close()
    single = Watchdog(PhaseClock(), str(tmp_path), rank=0, factor=10.0, floor_s=120.0, poll_s=60)
    try:
        assert single.limit() == 1200.0  # one process: no collective timeout to beat
    finally:
        single.close()


def test_until_the_first_step_is_done_the_cap_is_the_start_up_timeouts():
    """The first step's collectives run under dist.init_timeout_s (a compile may take long there)."""
    from dist_train.train.phases import PhaseClock, Watchdog

    clock = PhaseClock()
    dog = Watchdog(clock, "/nonexistent", rank=0, factor=10.0, floor_s=120.0, poll_s=60,
                   collective_timeout_s=600.0, first_step_timeout_s=1800.0)
    try:
        assert dog.limit() == 1200.0  # (3/4 of 1800 s is 1350 s: the usual first-steps limit holds)
        clock.iterations.append(30.0)
        assert dog.limit() == 450.0
    finally:
        dog.close()


def test_outside_the_loop_only_the_collective_timeout_bounds_a_phase(tmp_path):
    """The start-up (building the job, resuming) and the teardown (hand-back, summary broadcast, the
    group's end) are watched too; like a checkpoint save, their length does not follow the step's."""
    from dist_train.train.phases import STARTUP, TEARDOWN, PhaseClock, Watchdog

    clock = PhaseClock(STARTUP)
    dog = Watchdog(clock, str(tmp_path), rank=0, factor=10.0, floor_s=120.0, poll_s=60,
                   collective_timeout_s=600.0, first_step_timeout_s=200.0)
    try:
        assert dog.limit() == 150.0  # (3/4 of the start-up timeout)
        clock.reset()
        assert clock.phase == "other" and not clock.totals  # (the breakdown starts with the loop)
        clock.iterations.extend([0.1] * 3)
        assert dog.limit() == 120.0
        clock.enter(TEARDOWN)
        assert dog.limit() == 450.0  # (a hand-back of a large model is no hang)
    finally:
        dog.close()


@pytest.mark.slow
def test_a_rank_stalled_before_the_first_step_is_diagnosed(tmp_path):
    """A hang before the loop (here: one rank late to the resume's collectives) is dumped by both
    ranks before dist.init_timeout_s ends the job."""
    run = tmp_path / "hang"
    args = ["model.name=mlp", "data.name=digits", "data.batch_size=16", "data.num_workers=0", "train.max_steps=5",
            "logging.mlflow.enabled=false", "logging.progress_bar=off", "debug.faults=startup_stall@:1=20",
            "dist.watchdog_floor_s=2", "dist.init_timeout_s=12", f"run.dir={run}"]
    proc = _torchrun(args)
    assert proc.returncode != 0, proc.stderr[-3000:]
    dumps = sorted(p.name for p in (run / "hangs").iterdir())
    assert dumps == ["rank00000-step00000001-startup.txt", "rank00001-step00000001-startup.txt"], dumps
    stalled = (run / "hangs" / "rank00001-step00000001-startup.txt").read_text()
    assert "faults.py\", line" in stalled and " in delay\n" in stalled, stalled  # (its stack: the stall)
    waiting = (run / "hangs" / "rank00000-step00000001-startup.txt").read_text()
    assert "restore.py\", line" in waiting and " in resume\n" in waiting, waiting  # (in the resume's collectives)
    assert "rank 1 seems hung: the start-up before step 1 has been in phase startup" in proc.stderr
    assert "rank 0 seems hung: the start-up before step 1" in proc.stderr
    assert read_summary(run)["status"] == "failed"
    assert _processes_mentioning(str(run)) == []
