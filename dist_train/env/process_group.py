"""Process-group lifetime: init with a generous timeout, a clean teardown on every exit path."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Iterator

import torch
import torch.distributed as dist

from dist_train.env.cluster import ClusterEnv, backend_for, device_for

log = logging.getLogger(__name__)

# Long at init: the first collective waits for every rank to import torch, build the model
# and load data, which on a busy shared filesystem takes minutes.
INIT_TIMEOUT = datetime.timedelta(minutes=10)


@contextlib.contextmanager
def process_group(cluster: ClusterEnv, always: bool = False) -> Iterator[torch.device]:
    """Initialise the default process group (when world size > 1, or ``always``) and yield this
    rank's device. ``always`` gives a one-process job a 1-rank group, which FSDP, DeepSpeed and DDP
    need; it rendezvouses through an in-process store, so it takes no port.

    On exit (normal, exception or SystemExit) the group is destroyed. After an exception no
    barrier is attempted: the other ranks may be gone, and a barrier would hang until timeout.
    """
    device = device_for(cluster)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not cluster.is_distributed and not always:
        yield device
        return
    os.environ.setdefault("MASTER_ADDR", cluster.master_addr)
    os.environ.setdefault("MASTER_PORT", str(cluster.master_port))
    backend = backend_for(device)
    one_rank = cluster.world_size == 1
    dist.init_process_group(
        backend=backend,
        init_method=None if one_rank else f"tcp://{cluster.master_addr}:{cluster.master_port}",
        store=dist.HashStore() if one_rank else None,
        rank=cluster.rank,
        world_size=cluster.world_size,
        timeout=INIT_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    log.debug("process group up: backend=%s rank=%d/%d", backend, cluster.rank, cluster.world_size)
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


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src`` (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
