"""One checkpoint directory as a strategy sees it: the object a strategy's ``save_checkpoint`` /
``check_checkpoint`` / ``load_checkpoint`` is handed.

The strategy decides *what* to save (DCP state dicts, an engine's own files); this object decides
*where and how*: DCP files under ``dcp/`` read and written safely (``storage.py``), an engine's
folder ``native/``, and host-memory staging for background writes.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch.distributed.tensor import DTensor

from dist_train.checkpoint import decode, layout, storage

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
        ``defer(path, tensor)``: tensors that stay unchanged until the next optimizer step are
        copied later, by the stager's ``finish`` (see ``Stager``)."""
        if self._stager is None:
            return state
        return self._stager.stage(state, defer)


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
        self._pending_device_copies = False
        self._defer: Optional[Defer] = None
        self._deferred: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, source)
        self._versions: List[Tuple[Tuple[Any, ...], torch.Tensor, int]] = []  # (path, source, version)
        self._ready: Dict[torch.device, Any] = {}  # device -> CUDA event after the last update
        self.eager = False  # copy everything in stage (set after a deferred source changed)

    def stage(self, state: Dict[str, Any], defer: Optional[Defer] = None) -> Dict[str, Any]:
        self._pending_device_copies = False
        self._deferred, self._versions, self._ready = [], [], {}
        self._defer = None if self.eager else defer
        try:
            staged = self._copy(state, ())
        except BaseException:
            self.discard()
            raise
        finally:
            self._defer = None
        if self._pending_device_copies:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
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
        self._pending_device_copies |= non_blocking
        return buf

    def close(self) -> None:
        self.discard()
        self._buffers.clear()
