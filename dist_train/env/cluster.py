"""Who am I: rank, local rank, world size and node, from torchrun, SLURM, or nothing.

Detection reads only environment variables (passed in, so tests need no real cluster):
torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; under ``srun`` SLURM sets
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODEID and the node list, from which we derive the
rendezvous address (first host) and a port from the job id, so every task agrees without talking.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch


@dataclass(frozen=True)
class ClusterEnv:
    """The process's place in the job. ``source`` is torchrun, slurm or single."""

    source: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: Optional[str] = None
    step_id: Optional[str] = None  # SLURM_STEP_ID: the srun step (a job may run several at once)
    # Restarts of the workers by torchrun (--max-restarts; TORCHELASTIC_RESTART_COUNT, counted by
    # each node's agent for its own workers) and requeues of the SLURM job (SLURM_RESTART_COUNT).
    elastic_restarts: int = 0
    requeues: int = 0

    @property
    def restart_count(self) -> int:
        """How many times this job was started again before this process (elastic + requeue)."""
        return self.elastic_restarts + self.requeues

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise RuntimeError(f"environment variable {key} is required but not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {key}={value!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM node list such as ``n[1-3,5],gpu-a[01-02],login`` or ``r[1-2]n[01-02]`` into
    host names, in ``scontrol show hostnames`` order (the leftmost range varies slowest)."""
    hosts: List[str] = []
    for part in _top_level_parts(nodelist):
        hosts.extend(_expand_host(part))
    return hosts


def _top_level_parts(nodelist: str) -> List[str]:
    """Split on the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    return [p for p in parts if p]


def _expand_host(pattern: str) -> List[str]:
    """One host pattern with any number of bracketed ranges (``r[1-2]n[01,03]``)."""
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)", pattern)
    if not match:
        return [pattern]
    prefix, ranges, rest = match.groups()
    heads: List[str] = []
    for item in ranges.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            heads.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
        else:
            heads.append(f"{prefix}{item}")
    tails = _expand_host(rest)
    return [head + tail for head in heads for tail in tails]


def tasks_on_node(tasks_per_node: str, node_id: int) -> Optional[int]:
    """This node's task count from SLURM_TASKS_PER_NODE, e.g. ``2(x3),1`` -> [2, 2, 2, 1][node_id]."""
    counts: List[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts[node_id] if 0 <= node_id < len(counts) else None


def slurm_port(job_id: Optional[str]) -> int:
    """A rendezvous port every task of a job derives alike: 15000 + the job id modulo 17000 (below
    Linux's ephemeral ports; two jobs sharing a node collide only when their ids differ by a
    multiple of 17000, where the last 4 digits collided every 10000)."""
    digits = re.sub(r"\D", "", job_id or "")
    return 15000 + (int(digits) % 17000 if digits else 0)


def detect(env: Optional[Mapping[str, str]] = None) -> ClusterEnv:
    """torchrun variables first, then SLURM (only inside an ``srun`` step), else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        rank = _int(env, "RANK")
        return ClusterEnv(
            source="torchrun",
            rank=rank,
            local_rank=_int(env, "LOCAL_RANK", 0),
            world_size=world,
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", rank // max(local_world, 1)),
            num_nodes=max(world // max(local_world, 1), 1),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500),
            job_id=env.get("TORCHELASTIC_RUN_ID"),
            elastic_restarts=_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
            requeues=_int(env, "SLURM_RESTART_COUNT", 0),
        )
    # SLURM_PROCID exists in the batch script too, where it is not one of the job's ranks;
    # SLURM_STEP_ID marks a task started by srun.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        world = _int(env, "SLURM_NTASKS")
        # The step's nodes (task 0 runs on the first), which are the job's unless srun was given a
        # subset (--nodes, --exclude in DIST_TRAIN_SRUN_ARGS).
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                                or env.get("SLURM_NODELIST") or "127.0.0.1")
        num_nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", len(nodes)))
        job_id = env.get("SLURM_JOB_ID")
        node_rank = _int(env, "SLURM_NODEID", 0)
        # Tasks may be spread unevenly over nodes: this node's own count, else the even share.
        local_world = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "",
                                    node_rank) or max(world // max(num_nodes, 1), 1)
        return ClusterEnv(
            source="slurm",
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=world,
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=env.get("MASTER_ADDR") or nodes[0],
            master_port=_int(env, "MASTER_PORT", slurm_port(job_id)),
            job_id=job_id,
            step_id=env.get("SLURM_STEP_ID"),
            requeues=_int(env, "SLURM_RESTART_COUNT", 0),
        )
    return ClusterEnv(source="single")


def device_for(cluster: ClusterEnv) -> torch.device:
    """The local GPU when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", cluster.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device, configured: str = "auto") -> str:
    """The process group's backend (``dist.backend``): ``auto`` is NCCL on a GPU, gloo on the CPU."""
    if configured != "auto":
        return configured
    return "nccl" if device.type == "cuda" else "gloo"


def hostname() -> str:
    return socket.gethostname()
