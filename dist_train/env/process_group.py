"""Process-group lifetime: a bounded start-up, a clean teardown on every exit path.

Start-up goes through :mod:`dist_train.env.rendezvous`: a store that belongs to this attempt of the
job (so a group restarted by ``torchrun --max-restarts`` never meets the previous attempt's keys)
and a join that names the ranks it waits for and gives up after ``dist.init_timeout_s``.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from dist_train.env import collectives
from dist_train.env.cluster import ClusterEnv, backend_for, device_for
from dist_train.env.rendezvous import RendezvousTimeout, join, open_attempt

log = logging.getLogger(__name__)

# Long by default: the first collective waits for every rank to import torch, build the model
# and load data, which on a busy shared filesystem takes minutes (dist.init_timeout_s).
DEFAULT_INIT_TIMEOUT_S = 600.0

_restarts: Optional[int] = None


def group_restarts() -> Optional[int]:
    """How many times this job's process group was formed before the current one under the same
    launcher (torchrun ``--max-restarts``), agreed by every rank; None without a group.

    Unlike ``TORCHELASTIC_RESTART_COUNT``, which each node's agent counts for its own workers only,
    this counts every restart of the group, whichever node's worker failed.
    """
    return _restarts


def init_group(cluster: ClusterEnv, device: torch.device, timeout_s: float, backend: str = "auto") -> None:
    """Start the default process group of this attempt, or raise within about ``timeout_s``."""
    global _restarts
    backend = backend_for(device, backend)
    if cluster.world_size == 1:  # a 1-rank group needs no peers: an in-process store, no port
        store, _restarts = dist.HashStore(), cluster.elastic_restarts
    else:
        try:
            started = time.monotonic()  # one budget for both waits
            attempt = open_attempt(cluster, timeout_s)
            join(attempt, cluster, timeout_s, since=started)
        except RendezvousTimeout as exc:
            log.error("%s", exc)
            raise
        store, _restarts = attempt.store, attempt.restarts
        if _restarts:
            log.warning("process group formed again after %d restart(s) (this node's launcher counted %d); "
                        "resuming from the newest checkpoint", _restarts, cluster.elastic_restarts)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=cluster.rank,
        world_size=cluster.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if backend == "nccl" else None,  # (NCCL's communicator, made at once)
    )
    collectives.set_collective_timeout(timeout_s)  # (the groups made from now on get it too)
    log.debug("process group up: backend=%s rank=%d/%d", backend, cluster.rank, cluster.world_size)


@contextlib.contextmanager
def process_group(cluster: ClusterEnv, always: bool = False, init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
                  backend: str = "auto") -> Iterator[torch.device]:
    """Initialise the default process group (when world size > 1, or ``always``) and yield this
    rank's device. ``always`` gives a one-process job a 1-rank group, which FSDP, DeepSpeed and DDP
    need; it rendezvouses through an in-process store, so it takes no port.

    ``init_timeout_s`` (``dist.init_timeout_s``) bounds the start-up: a rank whose peers do not all
    arrive says which ranks it waits for and raises ``RendezvousTimeout``.

    On exit (normal, exception or SystemExit) the group is destroyed. After an exception no
    barrier is attempted: the other ranks may be gone, and a barrier would hang until timeout.
    """
    global _restarts
    device = device_for(cluster)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not cluster.is_distributed and not always:
        yield device
        return
    # Libraries that build their own groups (DeepSpeed) read the rendezvous from the environment.
    os.environ.setdefault("MASTER_ADDR", cluster.master_addr)
    os.environ.setdefault("MASTER_PORT", str(cluster.master_port))
    init_group(cluster, device, init_timeout_s, backend)
    ok = False
    try:
        yield device
        ok = True
    finally:
        if dist.is_initialized():
            if ok:
                # Every rank reaches here before anyone tears down, so no rank's last
                # collective is cut off by a peer closing its sockets.
                dist.barrier()
            dist.destroy_process_group()
        _restarts = None
