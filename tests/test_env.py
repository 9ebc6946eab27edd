"""Environment detection from torchrun, SLURM and bare variables."""
from __future__ import annotations

import os

import pytest

from conftest import free_port

from dist_train.env.cluster import detect, expand_nodelist, slurm_port


def test_single_process_when_nothing_set():
    env = detect({})
    assert env.source == "single" and env.rank == 0 and env.world_size == 1 and not env.is_distributed


def test_torchrun_variables():
    env = detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                  "GROUP_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert (env.source, env.rank, env.local_rank, env.world_size, env.local_world_size) == ("torchrun", 5, 1, 8, 4)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.master_port) == (1, 2, "node7", 29400)


def test_torchrun_wins_over_slurm():
    env = detect({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"})
    assert env.source == "torchrun"


def test_slurm_variables():
    env = detect({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                  "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456",
                  "SLURM_STEP_ID": "0"})
    assert (env.source, env.rank, env.local_rank, env.world_size, env.node_rank) == ("slurm", 3, 1, 4, 1)
    assert env.master_addr == "gpu07" and env.master_port == slurm_port("123456") == 15000 + 123456 % 17000
    assert env.local_world_size == 2 and env.num_nodes == 2 and env.job_id == "123456"


def test_a_slurm_step_on_part_of_the_job_meets_on_its_own_first_node():
    """srun given a subset of the job's nodes: task 0 runs on the step's first node, not the job's."""
    env = detect({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
                  "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_NNODES": "4", "SLURM_STEP_NODELIST": "n[3-4]",
                  "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"})
    assert env.master_addr == "n3" and env.num_nodes == 2 and env.local_world_size == 1, env


def test_slurm_batch_script_is_not_a_rank():
    """In the sbatch script itself (no srun step) we are not one of the job's ranks."""
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert env.source == "single"


@pytest.mark.parametrize("nodelist,hosts", [
    ("vm", ["vm"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[07-09,12],login", ["gpu07", "gpu08", "gpu09", "gpu12", "login"]),
    ("a1,b[01-02]-ib", ["a1", "b01-ib", "b02-ib"]),
    ("r[01-02]n[01-02]", ["r01n01", "r01n02", "r02n01", "r02n02"]),  # (was r01n[01-02], ...)
    ("r[1-2]n[1,3],x", ["r1n1", "r1n3", "r2n1", "r2n3", "x"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_bad_variable_is_named():
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        detect({"RANK": "0", "WORLD_SIZE": "two"})


def test_slurm_uneven_tasks_per_node():
    base = {"SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_STEP_ID": "0", "SLURM_TASKS_PER_NODE": "3,2"}
    assert detect({**base, "SLURM_NODEID": "1", "SLURM_LOCALID": "1"}).local_world_size == 2
    assert detect({**base, "SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_LOCALID": "0"}).local_world_size == 3
    compressed = {**base, "SLURM_NNODES": "4", "SLURM_NTASKS": "7", "SLURM_TASKS_PER_NODE": "2(x3),1",
                  "SLURM_JOB_NODELIST": "n[1-4]"}
    assert detect({**compressed, "SLURM_NODEID": "2"}).local_world_size == 2
    assert detect({**compressed, "SLURM_NODEID": "3"}).local_world_size == 1


def test_restart_counts_from_torchrun_and_slurm():
    env = detect({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "2", "SLURM_RESTART_COUNT": "1"})
    assert (env.elastic_restarts, env.requeues, env.restart_count) == (2, 1, 3)
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n1",
                  "SLURM_RESTART_COUNT": "4"})
    assert (env.source, env.elastic_restarts, env.requeues, env.restart_count) == ("slurm", 0, 4, 4)
    assert detect({}).restart_count == 0


def _attempt(rank: int, agent_port: int, queue) -> None:
    """One worker of one attempt, with torchrun's environment around an agent store on agent_port."""
    import torch
    import torch.distributed as dist

    from dist_train.env.process_group import group_restarts, process_group

    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(agent_port))
    cluster = detect({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(agent_port)})
    with process_group(cluster, init_timeout_s=60):
        value = torch.tensor([rank + 1.0])
        dist.all_reduce(value)
        queue.put((rank, group_restarts(), value.item()))


def test_a_restarted_group_ignores_the_previous_attempts_entries_in_the_agent_store():
    """What torchrun --max-restarts does, without torchrun: an agent store that outlives two
    attempts of two workers each. The second attempt finds the first one's published (now dead)
    store and must form its own group, with a restart count every rank agrees on."""
    import multiprocessing as mp

    import torch.distributed as dist

    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # A third, older entry that was never alive: a port nobody listens on.
    agent.set("dist_train/attempt_store", f"127.0.0.1 {free_port()} stale-token")
    ctx = mp.get_context("spawn")
    for attempt in range(2):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_attempt, args=(rank, agent.port, queue)) for rank in range(2)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0]
        assert results == [(0, attempt, 3.0), (1, attempt, 3.0)]


EXIT_SCRIPT = r'''
import atexit, logging, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from dist_train.env.shutdown import exit_process

out = sys.argv[1]
logging.basicConfig(filename=out + ".log", level=logging.INFO)
logging.info("buffered log line")
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
def late():
    time.sleep(0.3)
    open(out + ".thread", "w").write("joined")
threading.Thread(target=late).start()                              # non-daemon: must be waited for
ThreadPoolExecutor(max_workers=2).submit(time.sleep, 0.01)          # left open: must not hang the exit
sys.stdout.write("no newline at the end")                           # still in stdout's buffer
exit_process(3)
'''


def test_exit_process_does_what_interpreter_shutdown_does_then_exits(tmp_path):
    """Threads are joined, an open executor stops, atexit handlers and logging run, stdout is
    flushed, and the code is the process's exit status."""
    import subprocess
    import sys

    from conftest import clean_env

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(out)], env=clean_env(), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "no newline at the end"
    assert (tmp_path / "out.thread").read_text() == "joined"
    assert (tmp_path / "out.atexit").read_text() == "ran"
    assert "buffered log line" in (tmp_path / "out.log").read_text()


def _side_groups_follow_the_collective_timeout(rank: int, world: int) -> None:
    import time

    import torch.distributed as dist

    from dist_train.env import collectives

    import datetime

    sync = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))  # (the test's own)
    before = collectives.new_gloo_group()  # (as the checkpoint and preemption groups: made at start)
    collectives.set_collective_timeout(1.0)  # what the loop does after the first step (dist.timeout_s)
    after = collectives.new_gloo_group()
    for group in (before, after):
        if rank == 1:
            time.sleep(6)  # stuck (a hung filesystem in a save)
        t0 = time.monotonic()
        try:
            dist.barrier(group=group)
            failed = False
        except RuntimeError:
            failed = True
        waited = time.monotonic() - t0
        if rank == 0:  # torch's new_group default would have waited 30 minutes
            assert failed and waited < 5, (group is before, failed, waited)
        dist.barrier(group=sync)  # (both ranks past the stuck one before the next group)


def test_checkpoint_and_preemption_groups_fail_after_dist_timeout_s_too():
    """new_gloo_group's groups (checkpoint, preemption, async verdict) took torch's 30-minute
    default: a rank stuck in a checkpoint stalled the job that long whatever dist.timeout_s said."""
    from conftest import spawn

    spawn(_side_groups_follow_the_collective_timeout, 2)


def test_a_rank_refuses_the_store_of_another_job_on_its_port():
    """Two SLURM jobs on one node whose ids give the same port: the second job's ranks find the
    first job's store there and stop with a message naming both, instead of joining its key space."""
    from dist_train.env import rendezvous
    from dist_train.env.cluster import ClusterEnv

    port = free_port()
    job = dict(source="slurm", world_size=2, master_addr="127.0.0.1", master_port=port)
    first = rendezvous._fixed_attempt(ClusterEnv(rank=0, job_id="41234", step_id="0", **job), timeout_s=10)
    for other, this in ((dict(job_id="58234", step_id="0"), "job 58234 step 0"),  # another job
                        (dict(job_id="41234", step_id="1"), "job 41234 step 1")):  # a concurrent step
        with pytest.raises(RuntimeError, match=rf"another job's \(job 41234 step 0 .*this is {this}"):
            rendezvous._fixed_attempt(ClusterEnv(rank=1, **other, **job), timeout_s=10)
    mine = rendezvous._fixed_attempt(ClusterEnv(rank=1, job_id="41234", step_id="0", **job), timeout_s=10)
    assert mine.store.get(rendezvous.OWNER_KEY) == first.store.get(rendezvous.OWNER_KEY)
    # A store that names no owner (not a dist_train rank 0) is waited for, then named as such.
    import torch.distributed as dist

    bare = dist.TCPStore("127.0.0.1", free_port(), 2, is_master=True, wait_for_workers=False)
    lone = dict(job, master_port=bare.port)
    with pytest.raises(rendezvous.RendezvousTimeout, match="names no owner"):
        rendezvous._fixed_attempt(ClusterEnv(rank=1, job_id="41234", step_id="0", **lone), timeout_s=1)
