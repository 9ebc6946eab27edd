"""One checkpoint directory as a strategy sees it: the object a strategy's ``save_checkpoint`` /
``check_checkpoint`` / ``load_checkpoint`` is handed.

The strategy decides *what* to save (DCP state dicts, an engine's own files); this object decides
*where and how*: DCP files under ``dcp/`` read and written safely (``storage.py``), an engine's
folder ``native/``, and host-memory staging for background writes.
"""
from __future__ import annotations

import copy
import hashlib
import heapq
import os
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from dist_train.checkpoint import decode, layout, storage
from dist_train.env import collectives

#: ``defer(path in the state dict, tensor)``: may this tensor be copied after ``stage`` returns?
Defer = Callable[[Tuple[Any, ...], torch.Tensor], bool]


class CheckpointFiles:
    def __init__(self, path: str, group=None, stager=None, expected: Optional[Dict[str, dict]] = None):
        self.path = path
        self.group = group  # the checkpoint layer's own process group (None: the default one / none)
        self._stager = stager
        # Shard files (by name in dcp/) whose checksums are taken while ``read_state`` reads them
        # (a resume verifies the rest before loading): ``hashed`` names those this rank read whole.
        self.expected = expected or {}
        self.hashed: Set[str] = set()
        self._metadata: Any = None  # DCP's index, parsed once (a ResNet-18's: 3.5 ms)
        self.share_digest = 0  # what ``stage`` drew this rank's share from (0: it staged no share)

    @property
    def dcp_dir(self) -> str:
        return os.path.join(self.path, layout.DCP_DIR)

    @property
    def native_dir(self) -> str:
        """A folder for an engine's own checkpoint files."""
        return os.path.join(self.path, layout.NATIVE_DIR)

    def write_state(self, state: Dict[str, Any]) -> None:
        """Collective: write this rank's share of a DCP state dict."""
        storage.save(state, self.dcp_dir, self.group)

    def read_state(self, state: Dict[str, Any], adopt: bool = False) -> None:
        """Collective: fill a DCP state dict (tensors allocated, sharded or not) in place.
        ``adopt=True``: the caller takes the values from ``state`` afterwards (``set_state_dict``),
        so loaded tensors may replace its entries instead of being copied into them (see
        ``storage.load``)."""
        self.hashed |= storage.load(state, self.dcp_dir, self.group, self.expected, self._metadata, adopt=adopt)

    def read_model(self) -> Dict[str, torch.Tensor]:
        """The consolidated model weights, on the CPU (no collective)."""
        return storage.load_full_model(self.dcp_dir)

    def metadata(self) -> Any:
        """DCP's index of the checkpoint (``Metadata``: every stored entry's shape, dtype, key
        path), read once for this object (the checks before a load and the load share it)."""
        if self._metadata is None:
            self._metadata = decode.read_metadata(self.dcp_dir)
        return self._metadata

    def stored_shapes(self) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
        """``{name: (shape, dtype)}`` of the stored model tensors."""
        return storage.tensor_shapes(self.dcp_dir, metadata=self.metadata())

    def stage(self, state: Dict[str, Any], defer: Optional[Defer] = None) -> Dict[str, Any]:
        """A host-memory copy of ``state`` (DTensors stay DTensors), so training may change the
        originals while the copy is written; the stager reuses its buffers for the next save.
        Under several ranks only this rank's share of the replicated tensors (``own_share``; the
        manager then checks that the ranks' shares add up: ``share_digest``). ``defer(path,
        tensor)``: tensors that stay unchanged until the next optimizer step are copied later, by
        the stager's ``finish`` (see ``Stager``)."""
        if self._stager is None:
            return state
        world = collectives.world_size(self.group)
        if self._stager.share and world > 1:
            state, self.share_digest = own_share(state, collectives.rank(self.group), world)
        return self._stager.stage(state, defer)


def own_share(state: Dict[str, Any], rank: int, world: int) -> Tuple[Dict[str, Any], int]:
    """``state`` without the replicated tensors another rank writes, and a digest of the list the
    shares were drawn from (names, shapes, dtypes of the replicated tensors: the shares add up to
    the whole state only where every rank drew from the same list).

    A tensor that is not a DTensor (every tensor under DDP; buffers and step counters under FSDP)
    is the same on every rank, and DCP writes it from one rank only. An async save stages the
    state in host memory first (pinned, from a GPU): staged whole, a DDP node held one host copy of
    the whole model and optimizer per rank (8 on an 8-GPU node: ~100 GB for a 1B-parameter model
    with AdamW), and each rank copied all of it off its device. Each such tensor (a value of a
    mapping; those in lists stay, as their position is their name) now goes to one rank: the
    largest first, each to the rank with the fewest bytes so far, the same on every rank from the
    same list. DCP writes each entry once, from the rank that holds it."""
    leaves: List[Tuple[Tuple[Any, ...], torch.Tensor]] = []
    _replicated_leaves(state, (), leaves)
    digest = hashlib.blake2b(repr([(p, tuple(t.shape), str(t.dtype)) for p, t in leaves]).encode(), digest_size=8)
    loads = [(0, r) for r in range(world)]  # (bytes so far, rank): a heap, the least loaded first
    others: Set[Tuple[Any, ...]] = set()
    size = [t.numel() * t.element_size() for _, t in leaves]
    for i in sorted(range(len(leaves)), key=lambda i: (-size[i], i)):
        load, owner = loads[0]
        heapq.heapreplace(loads, (load + max(1, size[i]), owner))
        if owner != rank:
            others.add(leaves[i][0])
    return _without(state, (), others), 1 + (int.from_bytes(digest.digest(), "little") >> 2)


def _replicated_leaves(obj: Any, path: Tuple[Any, ...], out: List[Tuple[Tuple[Any, ...], torch.Tensor]]) -> None:
    for key, value in obj.items():
        if isinstance(value, dict):
            _replicated_leaves(value, path + (key,), out)
        elif isinstance(value, torch.Tensor) and not isinstance(value, (DTensor, ShardedTensor)):
            out.append((path + (key,), value))  # (a sharded tensor is each rank's own pieces)


def _without(obj: Any, path: Tuple[Any, ...], drop: Set[Tuple[Any, ...]]) -> Any:
    """A copy of the mappings of ``obj`` without the leaves at ``drop`` (the values are not copied;
    a mapping left empty is dropped too: it holds no entry of this rank's)."""
    out = copy.copy(obj)  # (the same kind of mapping: OrderedDict, ...)
    for key, value in obj.items():
        here = path + (key,)
        if here in drop:
            del out[key]
        elif isinstance(value, dict):
            kept = _without(value, here, drop)
            if kept or not value:
                out[key] = kept
            else:
                del out[key]
    return out


class Stager:
    """Reusable host-memory staging for asynchronous saves: each tensor of the state dict is copied
    into a (contiguous) buffer kept from the previous save (same place in the state dict, same
    shape and dtype), so a save after the first costs one memory copy per tensor and no
    allocation (fresh pages cost a page fault each: a first-touch copy here is 3-4x slower).
    Buffers are pinned when the tensors come from a GPU. DTensors (FSDP shards) stay DTensors
    around a staged local shard. Non-tensor leaves are immutable numbers and strings, or are
    deep-copied.

    Two kinds of copies. Most tensors are copied in ``stage``, on the training thread (from a GPU:
    issued without blocking, waited for once). Tensors that ``defer(path, tensor)`` names (the
    strategy names its trainable parameters and the optimizer state: only an optimizer step should
    change them) are copied by ``finish``, which the writer thread runs while the next forward and
    backward go on; the strategy waits for it before its next optimizer step
    (``Strategy.before_update``). From a GPU those copies run on a side stream that first waits for
    an event recorded on the training stream in ``stage`` (after the last update's kernels), so the
    copy engine works while the GPU computes; the sources stay alive (this stager holds them) until
    the side stream is synchronised.

    Code that changes a parameter in place outside the optimizer step (a task that clips weights,
    an ``Embedding`` with ``max_norm`` the strategy did not name) would race that copy: each
    deferred source's version counter is taken in ``stage``, and ``changed`` (on the training
    thread, at the wait) names those that moved. The manager then drops the save and sets
    ``eager``: every later save copies everything in ``stage``. (A change through ``.data`` moves
    no version counter: it cannot be seen.)

    A staged state dict is valid until the next ``stage`` (the manager waits for the previous write
    before it stages again)."""

    def __init__(self):
        self._buffers: Dict[Tuple[Any, ...], torch.Tensor] = {}
        self._used: Set[Tuple[Any, ...]] = set()  # the paths the last stage copied
        self._pending_device_copies: Set[torch.device] = set()  # devices with copies to wait for
        self._defer: Optional[Defer] = None
        self._deferred: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, source)
        self._versions: List[Tuple[Tuple[Any, ...], torch.Tensor, int]] = []  # (path, source, version)
        self._ready: Dict[torch.device, Any] = {}  # device -> CUDA event after the last update
        self.eager = False  # copy everything in stage (set after a deferred source changed)
        self.share = True  # stage only this rank's share of the replicated tensors (``own_share``)

    def stage(self, state: Dict[str, Any], defer: Optional[Defer] = None) -> Dict[str, Any]:
        self._pending_device_copies = set()
        self._deferred, self._versions, self._ready = [], [], {}
        self._defer = None if self.eager else defer
        self._used: Set[Tuple[Any, ...]] = set()
        try:
            staged = self._copy(state, ())
        except BaseException:
            self.discard()
            raise
        finally:
            self._defer = None
        stale = [p for p in self._buffers if p not in self._used]
        pinned = any(self._buffers[p].is_pinned() for p in stale)
        for path in stale:
            del self._buffers[path]  # (a tensor this save no longer holds, or another rank now writes)
        if pinned:  # (torch's caching host allocator keeps freed pinned blocks: give them back)
            torch._C._host_emptyCache()
        for device in self._pending_device_copies:  # the non-blocking device-to-host copies have landed
            torch.cuda.current_stream(device).synchronize()  # (the stream they were issued on, above)
        return staged

    @property
    def deferred(self) -> int:
        """How many copies ``finish`` has still to make."""
        return len(self._deferred)

    def finish(self) -> None:
        """Make the deferred copies (any thread); afterwards the staged state dict is complete."""
        copies, ready = self._deferred, self._ready
        on_device: Dict[torch.device, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        for buf, src in copies:
            if src.device.type == "cuda":
                on_device.setdefault(src.device, []).append((buf, src))
            else:
                buf.copy_(src)
        for device, pairs in on_device.items():
            with torch.cuda.device(device):
                stream = torch.cuda.Stream(device)
                stream.wait_event(ready[device])
                try:
                    with torch.cuda.stream(stream):
                        for buf, src in pairs:
                            buf.copy_(src, non_blocking=buf.is_pinned())
                finally:
                    stream.synchronize()  # (also after a failure: no copy still reads a source)
        self._deferred, self._ready = [], {}

    def changed(self) -> List[str]:
        """The deferred sources changed in place since ``stage`` (as ``model/0.weight``); call on
        the training thread, once the copies are made and before the optimizer step."""
        moved = ["/".join(str(k) for k in path) for path, src, version in self._versions if src._version != version]
        self._versions = []
        return list(dict.fromkeys(moved))

    def discard(self) -> None:
        """Forget the deferred copies (their save failed before the writer took them)."""
        self._deferred, self._versions, self._ready = [], [], {}

    def _copy(self, obj: Any, path: Tuple[Any, ...]) -> Any:
        if type(obj) is dict:
            return {k: self._copy(v, path + (k,)) for k, v in obj.items()}
        if isinstance(obj, dict):  # OrderedDict, defaultdict, ...: the same kind of mapping
            out = copy.copy(obj)
            for k, v in obj.items():
                out[k] = self._copy(v, path + (k,))
            return out
        if isinstance(obj, (list, tuple)):
            items = [self._copy(v, path + (i,)) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        if isinstance(obj, torch.Tensor):
            if isinstance(obj, DTensor):
                # Built around the host copy directly: DTensor.from_local would move it back to
                # the mesh's device (a second copy of every shard on the GPU during the write).
                # Watched for changes through the DTensor itself: in-place ops on the parameter
                # move its version counter, not the local shard's.
                return DTensor(self._tensor(obj.to_local(), path, watch=obj), obj._spec, requires_grad=False)
            return self._tensor(obj, path)
        if obj is None or isinstance(obj, (int, float, str, bytes, bool, torch.dtype, torch.device)):
            return obj
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor, path: Tuple[Any, ...], watch: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = t.detach()
        self._used.add(path)
        buf = self._buffers.get(path)
        # Contiguous buffers: a broadcast or overlapping view (stride 0) could not be written into
        # with its own strides, and the values are what a checkpoint keeps.
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
            self._buffers[path] = buf
        if self._defer is not None and self._defer(path, t):
            if t.device.type == "cuda" and t.device not in self._ready:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(t.device))
                self._ready[t.device] = event
            self._deferred.append((buf, t))
            self._versions.append((path, t, t._version))
            if watch is not None:
                self._versions.append((path, watch, watch._version))
            return buf
        non_blocking = t.device.type == "cuda" and buf.is_pinned()
        buf.copy_(t, non_blocking=non_blocking)
        if non_blocking:
            self._pending_device_copies.add(t.device)
        return buf

    def close(self) -> None:
        self.discard()
        self._buffers.clear()
