"""The store a process group starts from: one per attempt of the job, and a join that cannot hang.

Why not ``init_process_group``'s own ``env://``/``tcp://`` rendezvous:

* Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) torch makes every worker a client of the
  elastic agent's TCPStore at ``MASTER_ADDR:MASTER_PORT``. That store outlives the workers: after
  ``--max-restarts`` restarts the group, the new workers find the previous attempt's keys (gloo
  addresses, NCCL unique ids) and connect to dead peers ("connection refused"). A key prefix made
  from ``TORCHELASTIC_RESTART_COUNT`` repairs one node only: each agent counts its own restarts, and
  an agent that restarts because another node failed does not count at all (pytorch/pytorch#135712,
  #108158), so on several nodes the ranks would disagree about the prefix.
* So rank 0 of every attempt hosts a fresh TCPStore on a free port and publishes ``host port
  token`` under one key of the agent's store. The other ranks read that key, connect and compare
  the token. A stale entry (a previous attempt's rank 0) is recognised without any counter: its
  process is gone, so its port refuses connections (or, if the port was reused, the token differs),
  and the rank waits for the entry to change. The store dies with the attempt's rank 0.
* Without an agent store (srun tasks, a hand-set environment) every attempt is a new set of
  processes anyway: rank 0 hosts the store at ``MASTER_ADDR:MASTER_PORT``.
* A process that forms several groups (a script calling ``dist_train.fit`` twice) keeps its
  attempt's store and gives each group its own key space in it (``open_attempt``).

Every wait is a Python loop with a deadline (``dist.init_timeout_s``) that says, every few seconds,
which rank waits for what, and fails naming the ranks that never came; nothing blocks silently.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch.distributed as dist

from dist_train.env.cluster import ClusterEnv

log = logging.getLogger(__name__)

# Key in the agent's store under which rank 0 publishes this attempt's store; counter of attempts.
PUBLISH_KEY = "dist_train/attempt_store"
ATTEMPTS_KEY = "dist_train/attempts"
PROBE_S = 5.0          # one connection try to a published address
REPROBE_S = 5.0        # retry an address that failed (its rank 0 may just have been slow)
REPORT_EVERY_S = 10.0  # how often a waiting rank says what it waits for


class RendezvousTimeout(RuntimeError):
    """A rank waited ``dist.init_timeout_s`` for a peer that never came."""


@dataclass
class Attempt:
    """This attempt's store and how many attempts of the job's group came before it."""

    store: dist.Store
    restarts: int
    address: str


def uses_agent_store(env=None) -> bool:
    env = os.environ if env is None else env
    return env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in env


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.1))


class _Deadline:
    """Remaining time and rate-limited progress messages of one wait."""

    def __init__(self, timeout_s: float, what: Callable[[], str], since: Optional[float] = None):
        self.timeout_s, self.what = timeout_s, what
        self.t0 = time.monotonic() if since is None else since
        self.next_report = self.t0 + min(REPORT_EVERY_S, timeout_s / 3)

    def remaining(self) -> float:
        return self.timeout_s - (time.monotonic() - self.t0)

    def tick(self, rank: int) -> None:
        """Log what we wait for now and then; raise once the time is up."""
        now = time.monotonic()
        if self.remaining() <= 0:
            raise RendezvousTimeout(f"rank {rank}: {self.what()} after {self.timeout_s:.0f} s (dist.init_timeout_s); "
                                    "giving up")
        if now >= self.next_report:
            log.warning("rank %d: %s (%.0f s of %.0f s)", rank, self.what(), now - self.t0, self.timeout_s)
            self.next_report = now + REPORT_EVERY_S


def _listening(host: str, port: int, timeout_s: float) -> bool:
    """Whether anything accepts connections at host:port. A dead process's port refuses at once,
    where a TCPStore client would retry quietly until its timeout (and log each failure in C++)."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, PROBE_S)):
            return True
    except OSError:
        return False


def _connect(host: str, port: int, timeout_s: float) -> Optional[dist.TCPStore]:
    if not _listening(host, port, timeout_s):
        return None
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=_td(timeout_s))
    except RuntimeError:  # reset, timed out (DistNetworkError is one): the caller decides what it means
        return None


def _host_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    try:
        return dist.TCPStore(host, port, world_size, is_master=True, timeout=_td(timeout_s), wait_for_workers=False)
    except RuntimeError as exc:  # the port is taken (DistNetworkError)
        raise RuntimeError(f"rank 0 cannot host the process group's store on port {port}: {exc}") from None


def _agent_store(cluster: ClusterEnv, deadline: _Deadline) -> dist.TCPStore:
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    while True:
        store = _connect(host, port, min(PROBE_S, max(deadline.remaining(), 0.1)))
        if store is not None:
            return store
        deadline.tick(cluster.rank)
        time.sleep(0.1)


def _rank0_attempt(cluster: ClusterEnv, timeout_s: float) -> Attempt:
    deadline = _Deadline(timeout_s, lambda: f"cannot reach torchrun's store at {os.environ['MASTER_ADDR']}:"
                                            f"{os.environ['MASTER_PORT']}")
    agent = _agent_store(cluster, deadline)
    store = _host_store(cluster.master_addr, 0, cluster.world_size, timeout_s)
    restarts = agent.add(ATTEMPTS_KEY, 1) - 1
    token = uuid.uuid4().hex
    store.set("restarts", str(restarts))
    store.set("token", token)
    address = f"{cluster.master_addr}:{store.port}"
    agent.set(PUBLISH_KEY, f"{cluster.master_addr} {store.port} {token}")
    return Attempt(store, restarts, address)


def _follower_attempt(cluster: ClusterEnv, timeout_s: float) -> Attempt:
    state = {"what": "waiting for rank 0 to publish its store in torchrun's store"}
    deadline = _Deadline(timeout_s, lambda: state["what"])
    agent = _agent_store(cluster, deadline)
    retry_at = {}  # published value -> when to try it again
    while True:
        value = agent.get(PUBLISH_KEY).decode() if agent.check([PUBLISH_KEY]) else None
        if value is not None and time.monotonic() >= retry_at.get(value, 0.0):
            host, port, token = value.split()
            store = _connect(host, int(port), min(PROBE_S, max(deadline.remaining(), 0.1)))
            if store is not None and store.check(["token"]) and store.get("token").decode() == token:
                return Attempt(store, int(store.get("restarts")), f"{host}:{port}")
            retry_at[value] = time.monotonic() + REPROBE_S
            state["what"] = (f"rank 0's store at {host}:{port} does not answer (left by a previous attempt?); "
                             "waiting for this attempt's rank 0 to publish its own")
        deadline.tick(cluster.rank)
        time.sleep(0.1)


def _fixed_attempt(cluster: ClusterEnv, timeout_s: float) -> Attempt:
    """No agent store: rank 0 hosts the store at the job's rendezvous address. (The restart count
    is then this node's launcher's own, the best there is without a store that outlives attempts.)"""
    host, port = cluster.master_addr, cluster.master_port
    # Whose store it is: a port derived from the job id can be another job's (or another step's of
    # this job) on a shared node (see slurm_port), and joining its key space would stall both.
    owner = (f"job {cluster.job_id} step {cluster.step_id} attempt {cluster.requeues}, {cluster.world_size} ranks"
             if cluster.source == "slurm" else f"{cluster.world_size} ranks")
    if cluster.rank == 0:
        store = _host_store(host, port, cluster.world_size, timeout_s)
        store.set(OWNER_KEY, owner)
        return Attempt(store, cluster.elastic_restarts, f"{host}:{port}")
    waiting = [f"rank 0's store at {host}:{port} does not answer "
               "(is rank 0 running, and is the address reachable from here?)"]
    deadline = _Deadline(timeout_s, lambda: waiting[0])
    while True:
        store = _connect(host, port, min(PROBE_S, max(deadline.remaining(), 0.1)))
        if store is not None:
            try:
                found = store.get(OWNER_KEY).decode() if store.check([OWNER_KEY]) else None
            except RuntimeError as exc:  # (that store went away: connect again)
                found, waiting[0] = None, f"the store at {host}:{port} closed the connection ({exc})"
            else:
                if found is None:  # (rank 0 sets it right after it starts the store)
                    waiting[0] = (f"the store at {host}:{port} names no owner: not this job's rank 0 (another "
                                  "program, or an older dist_train, on this port?)")
            if found is not None:
                if found != owner:
                    raise RuntimeError(f"the store at {host}:{port} is another job's ({found}; this is {owner}): "
                                       "set MASTER_PORT to a free port for this job")
                return Attempt(store, cluster.elastic_restarts, f"{host}:{port}")
        deadline.tick(cluster.rank)
        time.sleep(0.1)


OWNER_KEY = "dist_train/owner"


# This process's attempt store, kept for every group it forms (a script calling fit() twice), and
# how many groups it has formed from it: each group gets its own key space in the store.
_held: Optional[Attempt] = None
_held_for: Optional[tuple] = None
_groups = 0


def open_attempt(cluster: ClusterEnv, timeout_s: float) -> Attempt:
    """Connect this rank to its attempt's store (see the module doc), within ``timeout_s``.

    A process that forms several groups one after another (``dist_train.fit`` called twice in one
    torchrun launch) keeps the store of its first: a new one would race with the old (a rank
    reading rank 0's published address before rank 0 replaced it joins the previous group's store
    and waits there, or connects to its dead peers). Every rank forms the same groups in the same
    order, so the n-th group of each rank uses the key space ``group<n>/`` of the same store.
    """
    global _held, _held_for, _groups
    key = (uses_agent_store(), cluster.rank, cluster.world_size, cluster.master_addr, cluster.master_port)
    if _held is None or _held_for != key:
        if uses_agent_store():
            make = _rank0_attempt if cluster.rank == 0 else _follower_attempt
        else:
            make = _fixed_attempt
        _held, _held_for, _groups = make(cluster, timeout_s), key, 0
    _groups += 1
    return Attempt(dist.PrefixStore(f"group{_groups}/", _held.store), _held.restarts, _held.address)


def join(attempt: Attempt, cluster: ClusterEnv, timeout_s: float, since: Optional[float] = None) -> None:
    """Wait until every rank of the group has announced itself in the attempt's store.

    Done in Python before ``init_process_group`` so that a missing rank is reported by number, every
    few seconds, and the wait ends ``timeout_s`` after ``since`` (default: now) with an exception.
    """
    store = attempt.store
    store.set(f"joined/{cluster.rank}", f"{os.uname().nodename} pid {os.getpid()}")
    keys = [f"joined/{r}" for r in range(cluster.world_size)]

    def missing() -> List[int]:
        return [r for r, key in enumerate(keys) if not store.check([key])]

    def what() -> str:
        gone = missing()
        shown = ", ".join(map(str, gone[:16])) + (" ..." if len(gone) > 16 else "")
        return (f"waiting for rank(s) {shown} to join the process group "
                f"({cluster.world_size - len(gone)}/{cluster.world_size} joined, store {attempt.address})")

    deadline = _Deadline(timeout_s, what, since)
    while not store.check(keys):
        deadline.tick(cluster.rank)
        time.sleep(0.05)
