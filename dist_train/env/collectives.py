"""Collectives that degrade to the identity without a process group.

Every package that needs "run this collective, or return the value when there is no process
group" uses these, so a single-process run and a unit test take the same code path as a 64-rank
job. ``group=None`` is the default group.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


def initialized() -> bool:
    """True inside a process group."""
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce ``tensor`` in place over all ranks (``op``: sum, max, min) and return it."""
    if initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                    "min": dist.ReduceOp.MIN}[op], group=group)
    return tensor


def max_int(value: int, device: torch.device, group=None) -> int:
    """The largest ``value`` of any rank."""
    return int(all_reduce(torch.tensor([value], device=device), "max", group).item())


def all_true(flag: bool, group=None, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is true on every rank (one failed rank makes it False everywhere)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    return bool(all_reduce(t, "min", group).item())


def any_true(flag: bool, group=None, device: Optional[torch.device] = None) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    return bool(all_reduce(t, "max", group).item())


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group=None) -> List[Any]:
    """Every rank's ``obj``, in rank order."""
    if not initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# The groups new_gloo_group made that live as long as the process group (checkpoint, preemption,
# async-save verdict), and the collective timeout in force: set_collective_timeout applies it to
# them too (torch's new_group would give them its 30-minute default, whatever dist.timeout_s says).
_kept_groups: List[Any] = []
_timeout_s: Optional[float] = None


def new_gloo_group(kept: bool = True):
    """A second group on gloo over the same ranks (None without a process group): for host-side
    collectives that run off the training thread (checkpoint writes) and must never interleave
    with the training collectives on the default group. It has the collective timeout in force
    (``set_collective_timeout``), and, ``kept``, follows its later changes."""
    if not initialized():
        return None
    import datetime

    timeout = datetime.timedelta(seconds=_timeout_s) if _timeout_s is not None else None
    group = dist.new_group(backend="gloo", timeout=timeout)
    if kept:
        _kept_groups[:] = [g for g in _kept_groups if _alive(g)] + [group]
    return group


def _alive(group) -> bool:
    return group in dist.distributed_c10d._world.pg_map  # (destroyed with the process group they belong to)


def set_collective_timeout(seconds: float, group=None) -> None:
    """From now on, a collective that waits longer than ``seconds`` fails (start-up keeps a long one):
    on ``group``, or on the default group and every group ``new_gloo_group`` keeps."""
    global _timeout_s
    if initialized():
        import datetime

        c10d = dist.distributed_c10d
        # set_timeout is public in recent torch (2.14); older releases (2.11) have it as _set_pg_timeout.
        setter = getattr(c10d, "set_timeout", None) or c10d._set_pg_timeout
        if group is not None:
            setter(datetime.timedelta(seconds=seconds), group)
            return
        _timeout_s = seconds
        for g in [None, *(g for g in _kept_groups if _alive(g))]:
            setter(datetime.timedelta(seconds=seconds), g)


def broadcast_tensors(tensors, device: torch.device, src: int = 0, group=None,
                      bucket_bytes: int = 64 << 20) -> None:
    """Collective: every rank's ``tensors`` (the same list on every rank) take rank ``src``'s
    values, in place. Same-dtype tensors go flattened on ``device`` (the group's: the CPU for
    gloo), one broadcast per bucket of at most ``bucket_bytes``, not one per tensor."""
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.numel() and not tensor.is_meta:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
    with torch.no_grad():
        for dtype, same in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):  # (one order on every rank)
            bucket: List[torch.Tensor] = []
            size = 0
            for i, tensor in enumerate(same):
                bucket.append(tensor)
                size += tensor.numel() * tensor.element_size()
                if size >= bucket_bytes or i == len(same) - 1:
                    flat = torch.cat([t.detach().reshape(-1).to(device) for t in bucket])
                    dist.broadcast(flat.view(torch.uint8) if dtype == torch.bool else flat, src=src, group=group)
                    offset = 0
                    for t in bucket:
                        t.copy_(flat[offset:offset + t.numel()].view_as(t))
                        offset += t.numel()
                    bucket, size = [], 0


def broadcast_module(module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s, in place (on a temporary
    gloo group, so that CPU tensors work whatever the default backend)."""
    if not initialized() or dist.get_world_size() == 1:
        return
    group = new_gloo_group(kept=False)
    try:
        broadcast_tensors([*module.parameters(), *module.buffers()], torch.device("cpu"), src=src, group=group)
    finally:
        dist.destroy_process_group(group)
