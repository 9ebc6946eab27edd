"""Elastic restarts under `torchrun --max-restarts`: a worker killed with SIGKILL makes torchrun
restart the group; the new workers form a fresh group (dist_train/env/rendezvous.py), resume from
the newest verified checkpoint, and the finished run equals an uninterrupted one."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import REPO, clean_env, free_port, read_metrics, read_summary, train_losses

STEPS = 60
QUICK = ["data.name=digits", "model.name=mlp", "model.hidden=256", "data.num_workers=0", "logging.progress_bar=off",
         f"train.max_steps={STEPS}", "checkpoint.every_steps=5", "logging.every_steps=1"]
TIMEOUT = 240


def torchrun(args: List[str], log: Path, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={max_restarts}",
           "--monitor-interval=0.1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "dist_train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def workers(agent_pid: int) -> Dict[int, int]:
    """rank -> pid of the agent's live worker processes (its children that carry a RANK)."""
    found: Dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{agent_pid}/task")
    except FileNotFoundError:
        return found
    for tid in tids:
        try:
            children = Path(f"/proc/{agent_pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for pid in map(int, children):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
            if rank is not None and state != "Z":
                found[rank] = pid
    return found


def last_step(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0)
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0


def wait_for(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"torchrun ended (exit {proc.returncode}) while {what}\n{log.read_text()[-6000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out {what}\n{log.read_text()[-6000:]}")


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s\n{log.read_text()[-6000:]}")
    return log.read_text()


def mlflow_runs(run_dir: Path) -> List[str]:
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        return [row[0] for row in db.execute("SELECT run_uuid FROM runs")]


@pytest.mark.slow
def test_random_sigkills_restart_resume_and_match_an_uninterrupted_run(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"[elastic] seed {seed}")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "elastic"
    ref_log, run_log = tmp_path / "ref.log", tmp_path / "elastic.log"
    # The uninterrupted reference runs alongside: same job, no restarts, no MLflow.
    ref = torchrun([*QUICK, f"run.dir={ref_dir}", "logging.mlflow.enabled=false"], ref_log)
    run = torchrun([*QUICK, f"run.dir={run_dir}"], run_log, max_restarts=3)
    kills = []
    try:
        seen_pids: set = set()
        floor = 6  # after the first checkpoint (step 5), so every restart resumes from one
        for _ in range(2):
            # A full new set of workers (the previous attempt's are all gone by then) that has
            # trained past everything the file showed before it: this attempt's own steps.
            pids = wait_for(lambda: (lambda w: w if len(w) == 2 and not set(w.values()) & seen_pids else None)(
                workers(run.pid)), run, run_log, "waiting for the workers of a new attempt")
            target = max(floor, last_step(run_dir)) + rng.randint(1, 8)
            wait_for(lambda: last_step(run_dir) >= target, run, run_log, f"waiting for step {target}")
            victim = rng.randrange(2)
            os.kill(pids[victim], signal.SIGKILL)
            kills.append((last_step(run_dir), victim))
            seen_pids |= set(pids.values())
        out = finish(run, run_log)
        ref_out = finish(ref, ref_log)
    finally:
        for proc in (run, ref):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"[elastic] SIGKILL at (step, rank): {kills}")
    assert run.returncode == 0, out[-8000:]
    assert ref.returncode == 0, ref_out[-8000:]
    assert all(step < STEPS for step, _ in kills), kills  # every kill landed mid-run
    assert out.count("process group formed again after") == 2 * 2, out[-8000:]  # both ranks, twice
    assert "process group formed again after 2 restart(s)" in out

    summary, ref_summary = read_summary(run_dir), read_summary(ref_dir)
    assert summary["status"] == "completed" and summary["steps"] == ref_summary["steps"] == STEPS, summary
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= 5, summary
    # One timeline, every step once, bitwise the losses of the uninterrupted run (fp32).
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert train_losses(run_dir) == train_losses(ref_dir)
    assert summary["train_loss"] == ref_summary["train_loss"] and summary["eval_loss"] == ref_summary["eval_loss"]
    # The MLflow run stays one run across the restarts (its id travels in the checkpoints).
    assert mlflow_runs(run_dir) == [summary["mlflow_run_id"]]
    # Nothing is left running: torchrun stopped every worker of every attempt.
    assert not workers(run.pid)


def test_a_rank_lost_right_after_a_commit_leaves_no_hole_in_the_timeline(tmp_path):
    """Rank 1 exits right after step 5's checkpoint is committed, before any later collective: step
    5's record (which needs every rank, for the loss average) was written before the save, so the
    restarted group resumes from 5 and the timeline has every step once."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    run = torchrun([*QUICK, "train.max_steps=8", f"run.dir={run_dir}", "logging.mlflow.enabled=false",
                    "debug.faults=after_commit@5:1"], log, max_restarts=1)
    out = finish(run, log)
    assert run.returncode == 0, out[-6000:]
    assert "exiting at after_commit of step 5" in out and "process group formed again after 1 restart(s)" in out
    summary = read_summary(run_dir)
    assert summary["resumed_from_step"] == 5 and summary["steps"] == 8, summary
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 9))


def _process_group_alone(rank: int, port: int, timeout_s: float, queue) -> None:
    """Rank ``rank`` of a 2-rank group whose other rank never starts."""
    import logging

    from dist_train.env.cluster import detect
    from dist_train.env.process_group import process_group

    logging.basicConfig(level=logging.WARNING)
    cluster = detect({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(port)})
    t0 = time.monotonic()
    try:
        with process_group(cluster, init_timeout_s=timeout_s):
            queue.put(("joined", 0.0))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put((f"{type(exc).__name__}: {exc}", time.monotonic() - t0))


def _groups_one_after_another(rank: int, port: int, agent_port: int, queue) -> None:
    """Rank ``rank`` forms three process groups in a row, as a script calling fit() three times."""
    import torch
    import torch.distributed as dist

    from dist_train.env.cluster import detect
    from dist_train.env.process_group import process_group

    env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    if agent_port:  # torchrun's way: a store that outlives the groups, hosted by the agent (here the test)
        os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(agent_port))
        env["MASTER_PORT"] = str(agent_port)
    cluster = detect(env)
    sums, kept = [], []
    try:
        for i in range(3):
            if rank == 0:
                time.sleep(0.5)  # rank 1 is back first, and finds the previous group's store
            with process_group(cluster, init_timeout_s=20):
                t = torch.tensor([float(rank + i)])
                dist.all_reduce(t)
                sums.append(t.item())
                # Objects of a finished fit (a checkpoint group in a reference cycle) may keep its
                # store alive: it still answers, with the old group's keys.
                kept.append(dist.distributed_c10d._get_default_store())
        queue.put((rank, sums))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("agent", [False, True], ids=["own-store", "torchrun-agent-store"])
def test_a_process_forms_one_group_after_another(agent):
    """dist_train.fit called several times in one launch: each call forms a new group from the
    same rendezvous (rank 0's store is kept, each group has its own keys), with or without an
    agent store that holds the previous group's published address."""
    import multiprocessing as mp

    import torch.distributed as dist

    agent_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) if agent else None
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_groups_one_after_another, args=(r, port, agent_store.port if agent else 0, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert got == {0: [1.0, 3.0, 5.0], 1: [1.0, 3.0, 5.0]}, got


@pytest.mark.parametrize("rank,expect", [
    (0, "rank 0: waiting for rank(s) 1 to join the process group (1/2 joined, store 127.0.0.1:"),
    (1, "rank 1: rank 0's store at 127.0.0.1:"),
])
def test_group_init_that_cannot_complete_fails_in_bounded_time(rank, expect):
    """A missing peer: the waiting rank names what it waits for and raises after dist.init_timeout_s
    instead of blocking in init_process_group."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_process_group_alone, args=(rank, free_port(), 3.0, queue))
    proc.start()
    try:
        message, seconds = queue.get(timeout=90)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert message.startswith("RendezvousTimeout: " + expect), message
    assert "after 3 s (dist.init_timeout_s)" in message, message
    assert seconds >= 3.0
    assert proc.exitcode == 0


def test_init_timeout_of_a_cli_job_is_configurable_and_reported(tmp_path, ok):
    """The CLI job of rank 1 whose rank 0 never comes: exit 1 within dist.init_timeout_s, a summary
    naming the wait, no traceback-only ending."""
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train", "data.name=digits", "model.name=mlp", "data.num_workers=0",
         "logging.mlflow.enabled=false", f"run.dir={tmp_path / 'run'}", "dist.init_timeout_s=2"],
        cwd=REPO, env=clean_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                                 "MASTER_PORT": str(port)}),
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    ok(proc, 1)
    assert "rank 1: rank 0's store at 127.0.0.1:%d does not answer" % port in proc.stderr, proc.stderr
    summary = (tmp_path / "run" / "summary.rank1.json").read_text()
    assert "RendezvousTimeout" in summary and "dist.init_timeout_s" in summary, summary


def test_bad_init_timeout_is_a_config_error(ok):
    from conftest import run_cli

    proc = ok(run_cli(["--check", "dist.init_timeout_s=0"]), 2)
    assert "dist.init_timeout_s" in proc.stderr and "Traceback" not in proc.stderr



# ----------------------------------------------------------------------------- SLURM, torchrun per node

def _slurm_worker(job_name: str, rank: int) -> int:
    """pid of the live worker of ``rank`` in the SLURM job named ``job_name`` (0 if none)."""
    want = [f"SLURM_JOB_NAME={job_name}".encode(), f"RANK={rank}".encode()]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if all(w in env for w in want) and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in env) and state != "Z":
            return int(entry)
    return 0


@pytest.fixture
def slurm_two_nodes():
    test_slurm = pytest.importorskip("test_slurm")
    yield from test_slurm._start_cluster(2)


@pytest.mark.slurm
def test_slurm_torchrun_per_node_restarts_after_sigkill(slurm_two_nodes, tmp_path):
    """DIST_TRAIN_LAUNCHER=torchrun on two simulated nodes (one worker each, c10d rendezvous):
    the worker on the second node is SIGKILLed after a checkpoint; only that node's torchrun counts
    a restart, the first node's restarts its worker because the rendezvous moved on, and the new
    group (formed once, agreed restart count 1 on both ranks) finishes the run."""
    from test_slurm import RunningJob

    cluster = slurm_two_nodes
    cluster.env.update(DIST_TRAIN_LAUNCHER="torchrun", DIST_TRAIN_MAX_RESTARTS="2",
                       DIST_TRAIN_RDZV_PORT=str(free_port()))
    run_dir = tmp_path / "run"
    args = [*QUICK, "train.max_steps=100", "checkpoint.every_steps=10", "logging.mlflow.enabled=false",
            f"run.dir={run_dir}"]
    job = RunningJob(cluster, args, tmp_path / "job.out", sbatch_opts=["--nodes=2", "--ntasks-per-node=1"],
                     timeout=360)
    victim = 0
    while job.proc.poll() is None and job.remaining() > 0:
        if last_step(run_dir) >= 12:
            victim = _slurm_worker(job.name, 1)
            if victim:
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.02)
    result = job.wait()
    assert victim, result.explain(cluster)
    assert result.rc == 0, result.explain(cluster)
    assert "torchrun on 2 node(s) x 1 process(es), max restarts 2" in result.output, result.output
    assert result.output.count("process group formed again after 1 restart(s)") == 2, result.explain(cluster)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 100 and summary["world_size"] == 2, summary
    assert summary["num_nodes"] == 2 and 10 <= summary["resumed_from_step"] < 100, summary
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 101))


def test_a_restart_before_the_first_checkpoint_continues_the_same_mlflow_run(tmp_path):
    """Rank 1 is killed after step 3, before any checkpoint: the restarted attempt starts from step 0
    and opened a second MLflow run (the run id travelled only in checkpoints)."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    run = torchrun([*QUICK, "train.max_steps=40", "checkpoint.every_steps=0", f"run.dir={run_dir}",
                    "debug.faults=step_sleep=0.05"], log, max_restarts=1)
    try:
        pids = wait_for(lambda: (lambda w: w if len(w) == 2 else None)(workers(run.pid)), run, log, "waiting for workers")
        wait_for(lambda: last_step(run_dir) >= 3, run, log, "waiting for step 3")
        os.kill(pids[1], signal.SIGKILL)
        out = finish(run, log)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, out[-6000:]
    summary = read_summary(run_dir)
    assert summary["resumed_from_step"] is None and summary["restarts"] == 1, summary
    assert mlflow_runs(run_dir) == [summary["mlflow_run_id"]]
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 41))
