"""Environment detection from torchrun, SLURM and bare variables."""
from __future__ import annotations

import pytest

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
    assert env.master_addr == "gpu07" and env.master_port == slurm_port("123456") == 15000 + 3456
    assert env.local_world_size == 2 and env.num_nodes == 2 and env.job_id == "123456"


def test_slurm_batch_script_is_not_a_rank():
    """In the sbatch script itself (no srun step) we are not one of the job's ranks."""
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert env.source == "single"


@pytest.mark.parametrize("nodelist,hosts", [
    ("vm", ["vm"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[07-09,12],login", ["gpu07", "gpu08", "gpu09", "gpu12", "login"]),
    ("a1,b[01-02]-ib", ["a1", "b01-ib", "b02-ib"]),
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
