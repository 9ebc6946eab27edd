"""torch.distributed.checkpoint (DCP) reading and writing: checksummed, safe, on every core.

Reading goes through ``SafeReader`` and ``SafeLoadPlanner``: ``.metadata`` and every item are
decoded by ``decode.py`` (no code from the file runs), a rank's files are read on threads, and a
loaded tensor is handed over whole where the destination is a plain CPU tensor of the same shape
and dtype, instead of being copied into it.

Writing goes through ``HashingWriter``, which checksums every file as its bytes are written (the
manifest then needs no read-back) and writes each item with ``encode.py`` (the bytes DCP's own
writer would write, without ``torch.save``'s per-item cost); a large share is written as several
files at once (``files_per_rank``).
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import (DefaultLoadPlanner, DefaultSavePlanner,
                                                           create_default_local_load_plan)
from torch.distributed.checkpoint.filesystem import (DEFAULT_SUFFIX, FileSystem, SerializationFormat, _item_size,
                                                     _split_by_size_and_type, _StorageInfo)
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from dist_train.checkpoint import checksum, encode, layout, protocol_check
from dist_train.checkpoint.decode import (NotPlain, load_leaf, load_tensor_item, read_metadata, read_sequential,
                                          read_small_item, small_item)


protocol_check.install()  # (DCP's per-value protocol test, without typing's slow path on Python 3.11)


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose ``.metadata`` is read by the allow-list unpickler, and which reads
    each file's items in file order, handing whole tensors over instead of copying them.

    ``expected``: ``{file name: manifest entry}`` of shard files whose checksums were not verified
    before the load. Each of them that this rank needs at least half of is read whole, from start
    to end, hashed on the way (``checksum.HashingReader``), its items decoded from the bytes as they
    pass; a file that does not match its entry raises ``CorruptFile``. ``hashed`` names the files
    that matched (the others are hashed after the load: ``Restorer.check_rest``)."""

    def __init__(self, path: str, expected: Optional[Dict[str, dict]] = None, metadata: Optional[Metadata] = None):
        super().__init__(path)
        self.expected = expected or {}
        self.hashed: Set[str] = set()
        self._metadata = metadata  # (already read by the caller, through ``read_metadata``)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._metadata if self._metadata is not None else read_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        if not isinstance(planner, SafeLoadPlanner) or any(
                self.storage_data[item.storage_index].transform_descriptors for item in plan.items):
            return super().read_data(plan, planner)  # (stream transforms: DCP's own loop)
        per_file: Dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        lock = threading.Lock()  # the planner's state dict updates (set_element) are not thread-safe

        def read_file(relative_path: str) -> None:
            if relative_path in self.expected and 2 * self._wanted(per_file[relative_path]) >= \
                    self.expected[relative_path].get("size", 0):
                self._read_hashed(relative_path, per_file[relative_path], planner, lock)
                return
            # (this rank needs less than half of the file, e.g. the model's items only: reading it
            # whole to hash it here would cost more than the ranks' share of ``check_rest``)
            items = sorted(per_file[relative_path], key=lambda it: self.storage_data[it.storage_index].offset)
            try:
                with open(Path(self.path) / relative_path, "rb") as stream:
                    for item in items:
                        self._read_item(stream, item, planner, lock)
            except Exception as exc:
                # A damaged header or pickle fails to decode before any hash could say why: a file
                # not yet verified is hashed now, so that damage reads as corruption (resume then
                # falls back to an older checkpoint) and not as a load error every rerun repeats.
                entry = self.expected.get(relative_path)
                try:
                    problem = checksum.check_file(str(Path(self.path) / relative_path), entry) if entry else None
                except OSError:
                    problem = None  # (unreadable: the error above says so)
                if problem:
                    raise CorruptFile(f"{layout.DCP_DIR}/{relative_path}: {problem}") from exc
                raise

        layout.parallel(read_file, list(per_file), _MAX_FILES)  # a share in several files: read at once
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _wanted(self, items: list) -> int:
        """Bytes of a file that ``items`` read (each stored item once)."""
        return sum(length for _offset, length in {(self.storage_data[it.storage_index].offset,
                                                   self.storage_data[it.storage_index].length) for it in items})

    def _read_item(self, stream: Any, item: ReadItem, planner: SafeLoadPlanner, lock: threading.Lock) -> None:
        view = self._slice_file(stream, self.storage_data[item.storage_index])
        if item.type == LoadItemType.BYTE_IO:
            value = load_leaf(view.read(-1))
            with lock:
                planner.load_value(item, value)
            return
        info = self.storage_data[item.storage_index]
        # A small item is read in one call (then decoded from memory); a large one is read by the
        # zip reader straight from the file into the tensor (no second copy).
        if info.length < _SMALL_ITEM:
            data = bytearray(info.length)
            if view.readinto(data) != info.length:
                raise EOFError(f"{info.relative_path}: the item at byte {info.offset} ends early")
            tensor = small_item(data)
        else:
            tensor = load_tensor_item(view)
        self._place(item, tensor, planner, lock, adopt=True)

    @staticmethod
    def _place(item: ReadItem, tensor: torch.Tensor, planner: SafeLoadPlanner, lock: threading.Lock,
               adopt: bool) -> None:
        """A loaded tensor (a whole stored item) into the state dict: handed over (``adopt``), or
        the piece ``item`` asks for copied into its destination."""
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        with lock:
            if adopt and planner.adopt(item, tensor):
                return
            target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise RuntimeError(f"{item.storage_index}: stored size {tuple(tensor.size())} != {tuple(target.size())}")
        if not _same_memory(target, tensor):  # (read into the destination already: see ``destination``)
            target.copy_(tensor)
        with lock:
            planner.commit_tensor(item, target)

    def _read_hashed(self, relative_path: str, items: list, planner: SafeLoadPlanner, lock: threading.Lock) -> None:
        """Read a whole shard file once, hashing every byte, and load the items of ``items`` from
        it on the way (several read items of one stored item share one decode)."""
        entry = self.expected[relative_path]
        stored: Dict[Tuple[int, int], list] = {}
        for item in items:
            info = self.storage_data[item.storage_index]
            stored.setdefault((info.offset, info.length), []).append(item)
        path = Path(self.path) / relative_path
        with open(path, "rb") as stream:
            reader = checksum.HashingReader(stream, checksum.algorithm_of(entry) or checksum.ALGORITHM)
            try:
                for offset, length in sorted(stored):
                    reader.skip_to(offset)
                    if reader.pos != offset:
                        raise EOFError(f"the file ends before byte {offset}")
                    readers = stored[(offset, length)]
                    if readers[0].type == LoadItemType.BYTE_IO:
                        value = load_leaf(reader.read(length))
                        with lock:
                            for item in readers:
                                planner.load_value(item, value)
                        continue
                    with lock:
                        into = planner.destination(readers[0]) if len(readers) == 1 else None
                    if length < _SMALL_ITEM:
                        tensor = read_small_item(reader, length, into)
                    else:
                        tensor = self._hashed_tensor(reader, path, offset, length, into)
                    if into is not None and _same_memory(into, tensor):  # (read into its destination)
                        with lock:
                            planner.commit_tensor(readers[0], into)
                        continue
                    for item in readers:
                        self._place(item, tensor, planner, lock, adopt=len(readers) == 1)
                found = reader.finish()
            except Exception as exc:
                # A damaged file can fail to decode before its end is reached: its checksum names
                # the cause (else the decoding error stands).
                problem = _problem(reader, entry)
                if problem:
                    raise CorruptFile(f"{layout.DCP_DIR}/{relative_path}: {problem}") from exc
                raise
        problem = checksum.mismatch(found, entry)
        if problem:
            raise CorruptFile(f"{layout.DCP_DIR}/{relative_path}: {problem}")
        with lock:
            self.hashed.add(relative_path)

    def _hashed_tensor(self, reader: checksum.HashingReader, path: Path, offset: int, length: int,
                       into: Optional[torch.Tensor]) -> torch.Tensor:
        """A large stored tensor item; ``into``: the destination to read its bytes into (see
        ``SafeLoadPlanner.destination``)."""
        try:
            return read_sequential(reader, length, into)  # (into the destination or a new tensor, hashed)
        except NotPlain:
            # Not the plain form: the zip reader decodes it from a second handle; the hash reads on.
            with open(path, "rb") as again:
                tensor = load_tensor_item(self._slice_file(again, _StorageInfo(path.name, offset, length)))
            reader.skip_to(offset + length)
            return tensor


def _holds_sharded_tensor(obj: Any, depth: int = 0) -> bool:
    """Whether a (nested) state dict holds a ``ShardedTensor`` (or is too deep to tell)."""
    if isinstance(obj, ShardedTensor) or depth > 32:
        return True
    if isinstance(obj, Mapping):  # (DCP's traversal enters any mapping)
        obj = obj.values()
    elif not isinstance(obj, (list, tuple)):
        return False
    return any(_holds_sharded_tensor(value, depth + 1) for value in obj if not isinstance(value, torch.Tensor)
               or isinstance(value, ShardedTensor))


def _whole_read_item(fqn: str, stored: Any, obj: Any) -> Optional[ReadItem]:
    """The read item DCP's planner makes for ``obj`` at ``fqn`` when it is a non-tensor leaf, or a
    whole plain tensor (not empty) stored as one chunk of its very shape; else None."""
    if isinstance(stored, BytesStorageMetadata) and not isinstance(obj, DTensor):  # (DCP skips a DTensor off its mesh)
        none = torch.Size((0,))
        return ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(fqn), dest_offsets=none,
                        storage_index=MetadataIndex(fqn), storage_offsets=none, lengths=none)
    if type(obj) is not torch.Tensor or not isinstance(stored, TensorStorageMetadata) or len(stored.chunks) != 1:
        return None
    size, chunk = obj.size(), stored.chunks[0]
    if stored.size != size or chunk.sizes != size or any(chunk.offsets) or not obj.numel():
        return None  # (DCP names a size mismatch; an empty tensor gets no read item)
    zeros = torch.Size((0,) * len(size))
    return ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(fqn, zeros, 0), dest_offsets=zeros,
                    storage_index=MetadataIndex(fqn, chunk.offsets, 0), storage_offsets=zeros, lengths=size)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def _problem(reader: checksum.HashingReader, entry: dict) -> Optional[str]:
    """What is wrong with a file whose reading stopped part-way: its checksum read to the end
    (None: it matches), or the read error."""
    try:
        return checksum.mismatch(reader.finish(), entry)
    except OSError as exc:
        return f"unreadable: {exc}"


class CorruptFile(Exception):
    """A shard file read during a load does not match its manifest entry."""


_SMALL_ITEM = 1 << 20  # DCP items smaller than this are read into memory in one call


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor leaves with ``load_leaf`` (no code runs), and that can take
    a loaded tensor over whole instead of copying it into the destination (``adopt``, when the caller
    allowed it with ``adopt_loaded``: else every tensor is filled in place, as ``dcp.load`` does)."""

    def __init__(self, *args: Any, adopt_loaded: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.adopt_loaded = adopt_loaded

    def create_local_plan(self) -> LoadPlan:
        """DCP's local plan, with the read item of each common entry built directly: a whole plain
        tensor stored as one whole chunk, or a non-tensor leaf (what a single process or DDP
        loads, and the leaves of any strategy). DCP's general way (per entry: chunk lists, a
        sweep over overlaps, about 16 us) plans everything else, entry by entry, and the whole
        state dict when the checkpoint holds keys it lacks (DCP's handling of checkpoints from
        torch <= 2.3 looks at those)."""
        if self.metadata is None:
            raise AssertionError("set_up_planner first")
        stored = self.metadata.state_dict_metadata
        if self.flatten_state_dict and len(stored.keys() - self.state_dict.keys()):
            return super().create_local_plan()
        items: List[ReadItem] = []
        for fqn, obj in self.state_dict.items():
            item = _whole_read_item(fqn, stored.get(fqn), obj)
            if item is None:
                items.extend(create_default_local_load_plan({fqn: obj}, self.metadata, not self.allow_partial_load).items)
            else:
                items.append(item)
        return LoadPlan(items)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.load_value(read_item, load_leaf(value.getvalue()))

    def load_value(self, read_item: ReadItem, obj: Any) -> None:
        """A non-tensor leaf, already decoded by ``load_leaf``, into the state dict."""
        self._replace(read_item, obj)

    def _replace(self, read_item: ReadItem, obj: Any) -> None:
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    def destination(self, read_item: ReadItem) -> Optional[torch.Tensor]:
        """The tensor ``read_item`` is loaded into, when the stored item's bytes can be read into
        its memory as they are: a whole plain contiguous CPU tensor (a parameter, an optimizer
        state tensor, an FSDP shard's local tensor) that owns its storage, of the stored dtype and
        shape, the item read whole. Reading there skips allocating a new tensor (fresh pages cost
        a page fault each) and the copy into the destination afterwards. Else None."""
        stored = self.stored_layout(read_item)
        if stored is None or any(read_item.dest_offsets) or any(read_item.storage_offsets):
            return None
        dtype, shape = stored
        dest = self.state_dict.get(read_item.dest_index.fqn)
        if hasattr(dest, "__get_tensor_shard__"):  # a DTensor: its local shard (as DCP's lookup_tensor)
            dest = dest.__get_tensor_shard__(read_item.dest_index)
        # (a tensor with ``global_shape`` is a CheckpointableTensor, whose shards DCP maps itself)
        if (type(dest) is not torch.Tensor or hasattr(dest, "global_shape") or dest.device.type != "cpu"
                or dest.dtype != dtype or not dest.is_contiguous() or dest.storage_offset() != 0
                or dest.untyped_storage().nbytes() != dest.nbytes or tuple(read_item.lengths) != tuple(dest.shape)):
            return None
        if dest.untyped_storage().data_ptr() in self._shared_memory():
            return None  # (tied weights: two items may be read into it at once)
        return dest if shape == tuple(dest.shape) else None

    def stored_layout(self, read_item: ReadItem) -> Optional[Tuple[torch.dtype, Tuple[int, ...]]]:
        """(dtype, shape) of the stored item ``read_item`` reads from (a whole tensor, or the
        chunk of one that was saved as an item), from the checkpoint's index; None if unknown."""
        meta = self.metadata.state_dict_metadata.get(read_item.storage_index.fqn) if self.metadata else None
        if not isinstance(meta, TensorStorageMetadata):
            return None
        index, offset = read_item.storage_index.index, tuple(read_item.storage_index.offset or ())
        chunks = meta.chunks
        chunk = chunks[index] if index is not None and 0 <= index < len(chunks) and \
            tuple(chunks[index].offsets) == offset else next((c for c in chunks if tuple(c.offsets) == offset), None)
        dtype = meta.properties.dtype  # (a crafted index may hold a layout there: the general decoder then)
        return (dtype, tuple(chunk.sizes)) if chunk is not None and isinstance(dtype, torch.dtype) else None

    _shared: Optional[Set[int]] = None

    def _shared_memory(self) -> Set[int]:
        """The storages that more than one entry of the state dict lives in."""
        if self._shared is None:
            seen: Dict[int, int] = {}
            for value in self.state_dict.values():
                local = value.to_local() if isinstance(value, DTensor) else value
                if isinstance(local, torch.Tensor) and local.device.type == "cpu":
                    ptr = local.untyped_storage().data_ptr()
                    seen[ptr] = seen.get(ptr, 0) + 1
            self._shared = {ptr for ptr, n in seen.items() if n > 1}
        return self._shared

    def adopt(self, read_item: ReadItem, tensor: torch.Tensor) -> bool:
        """Put ``tensor`` (just loaded, owned by nobody else) in the state dict in place of its
        destination, when that is a whole plain CPU tensor of the same shape, dtype and layout:
        the copy into it would be wasted, since callers read the values from the state dict
        (``set_state_dict`` copies model weights into the parameters, and an optimizer keeps the
        loaded state tensors themselves, as with ``torch.load``). Sharded or device tensors are
        filled in place as usual (returns False)."""
        if not self.adopt_loaded:
            return False
        # The state dict's own object, not lookup_tensor's: for a DTensor that is its local shard.
        dest = self.state_dict.get(read_item.dest_index.fqn)
        if not isinstance(dest, torch.Tensor):
            return False
        whole = all(o == 0 for o in read_item.dest_offsets) and tuple(read_item.lengths) == tuple(dest.shape)
        if (type(dest) is not torch.Tensor or dest.device.type != "cpu" or not whole or dest.requires_grad
                or tensor.shape != dest.shape or tensor.dtype != dest.dtype or tensor.stride() != dest.stride()):
            return False
        self._replace(read_item, tensor)
        self.state_dict[read_item.dest_index.fqn] = tensor
        return True


class _HashingFileSystem(FileSystem):
    """DCP's local filesystem, checksumming every file it writes as the bytes go out."""

    def __init__(self, synced: bool):
        super().__init__()
        self.synced = synced

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = checksum.HashingFile(raw)
            yield stream
            stream.close()  # (its buffer into the file; DCP usually closes it already)
        entry = stream.entry()
        if entry is not None:
            checksum.record(str(path), entry, synced=self.synced)

    def rename(self, path: Any, new_path: Any) -> None:
        super().rename(path, new_path)
        checksum.moved(str(path), str(new_path))


class HashingWriter(dcp.FileSystemWriter):
    """FileSystemWriter whose files are checksummed while written (see ``checksum.record``).

    DCP stores each tensor as a small ``torch.save`` zip inside its shard file, and ``torch.save``
    computes a CRC32 of every zip record, at about 1 GB/s: as long as writing the bytes. Nothing
    checks those CRCs (``torch.load`` does not), and the manifest's checksum covers every byte of
    the file, so they are switched off while the shards are written (``_no_zip_crc``, on each
    writing thread only).
    """

    def __init__(self, path: str, **kwargs: Any):
        super().__init__(path, **kwargs)
        self.fs = _HashingFileSystem(synced=self.sync_files)

    def write_data(self, plan: SavePlan, planner: Any) -> Future:
        """DCP's own file layout and results, each item written by ``encode.py`` (the bytes
        ``torch.save`` writes, without its per-item cost); a rank's files are written at once.
        Stream transforms, other serialization formats and a state on a GPU (``_device_state``)
        go through DCP's own loop."""
        if (self.transforms.extensions or not self.single_file_per_rank
                or self.serialization_format != SerializationFormat.TORCH_SAVE or _device_state(plan, planner)):
            with _no_zip_crc():  # (on this thread only: DCP's other writer threads keep theirs)
                return super().write_data(plan, planner)
        buckets = _split_by_size_and_type(self.thread_count, plan.items)
        names = [f"{plan.storage_data.prefix}{i}{DEFAULT_SUFFIX}" for i in range(len(buckets))]
        by_size = self._dcp_sorts_by_size()
        written = layout.parallel(lambda i: self._write_file(names[i], buckets[i], planner, by_size),
                                  range(len(buckets)), threads=len(buckets))
        fut: Future = Future()
        fut.set_result([result for results in written for result in results])
        return fut

    def _write_file(self, name: str, items: list, planner: Any, by_size: bool) -> list:
        results = []
        with _no_zip_crc(), self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:

            def done(item: WriteItem, offset: int) -> None:
                length = stream.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, offset, length)))

            for item in items:
                if item.type == WriteItemType.BYTE_IO:
                    offset = stream.tell()
                    stream.write(planner.resolve_data(item).getbuffer())
                    done(item, offset)
            tensor_items = [item for item in items if item.type != WriteItemType.BYTE_IO]
            if by_size:
                tensor_items.sort(key=_item_size)  # (the order of DCP's copy-ahead loader: the same file)
            for item in tensor_items:
                tensor = planner.resolve_data(item).detach().cpu()
                if tensor.untyped_storage().nbytes() != tensor.nbytes:
                    tensor = tensor.clone()  # (a view: its own storage only, as DCP does)
                offset = stream.tell()
                encode.write_tensor(stream, tensor)
                done(item, offset)
            if self.sync_files:
                stream.flush()
                os.fsync(stream.fileno())
        return results

    def _dcp_sorts_by_size(self) -> bool:
        """Whether DCP's own loop would write this file's tensors smallest first (its
        ``_OverlappingCpuLoader``: one file per rank on a machine with a GPU)."""
        backend = getattr(torch, torch._C._get_privateuse1_backend_name(), None)
        accelerator = torch.cuda.is_available() or bool(backend and backend.is_available())
        return self.thread_count == 1 and accelerator and self.per_thread_copy_ahead > 0


def _device_state(plan: SavePlan, planner: Any) -> bool:
    """Whether the state to write is on a GPU (judged by its first tensor): DCP's own loop then
    copies it to the host ahead of the writes, without blocking, where ours would copy each tensor
    when it is written. A staged (async) save's state is in host memory already."""
    first = next((item for item in plan.items if item.type != WriteItemType.BYTE_IO), None)
    return first is not None and planner.resolve_data(first).device.type != "cpu"


class FastSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner whose non-tensor leaves are encoded by ``encode.object_archive``."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return encode.object_archive(object)
        return super().transform_object(write_item, object)


_no_zip_crc = encode.no_zip_crc


_FILE_BYTES = 32 << 20  # a rank's share is split into files of at least this size ...
_MAX_FILES = 8  # ... at most this many, and at most one per CPU core of the rank


def files_per_rank(state_dict: Dict[str, Any]) -> int:
    """How many files this rank's share of ``state_dict`` is written to (DCP's ``thread_count``).

    A file's checksum is one sequential hash: a rank's share in a single file is verified on one
    core, at resume, however many the machine has. Several files are written and hashed at once
    (file I/O and XXH3 release the GIL), and verified at once. Small shares stay one file: each
    file costs an open, a writer thread and an fsync.
    """
    total = 0
    stack = [state_dict]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, torch.Tensor):
            local = obj.to_local() if isinstance(obj, DTensor) else obj
            total += local.numel() * local.element_size()
    # torchrun's ranks share the node's cores; srun binds each task to its own (the affinity mask).
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = max(1, _cpus() // local_world)
    return max(1, min(total // _FILE_BYTES, _MAX_FILES, cores))


def _cpus() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not Linux)
        return os.cpu_count() or 1


def save(state_dict: Dict[str, Any], dcp_dir: str, group=None) -> None:
    """Collective (every rank of ``group``): write this rank's share of ``state_dict``.

    DCP deduplicates replicated tensors (DDP) across ranks and writes sharded ones (FSDP) as
    shards. The files are not fsynced here, one after the other, but by the commit, together with
    the checkpoint's other files (``layout.make_durable``).
    """
    writer = HashingWriter(dcp_dir, sync_files=False, thread_count=files_per_rank(state_dict))
    with _plain_errors("writing", dcp_dir), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state_dict, storage_writer=writer, planner=FastSavePlanner(), process_group=group,
                 no_dist=not _distributed())


def load(state_dict: Dict[str, Any], dcp_dir: str, group=None, expected: Optional[Dict[str, dict]] = None,
         metadata: Optional[Metadata] = None, adopt: bool = False) -> Set[str]:
    """Collective: fill ``state_dict`` (its tensors allocated, sharded or not) in place.
    ``adopt=True``: the caller reads the values from ``state_dict`` afterwards (``set_state_dict``),
    so a whole plain CPU tensor loaded may replace its entry instead of being copied into it (a
    copy saved); the caller's own tensors (a model's parameters under ``model.state_dict()``) then
    keep their values.

    The checkpoint may have been written at any world size and by any DCP strategy: DCP reads
    exactly the pieces this rank's tensors need. ``expected`` (``{file name: manifest entry}``):
    shard files not verified yet, hashed while they are read (see ``SafeReader``); returns the
    names of those this rank hashed. One that does not match raises ``CorruptCheckpoint`` on
    every rank. ``metadata``: the checkpoint's ``.metadata`` if the caller has read it already.
    """
    reader = SafeReader(dcp_dir, expected, metadata)
    with _plain_errors("reading"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        # (DCP's pass that rewrites FSDP1's nested ShardedTensors copies the whole state dict:
        # 0.3 ms for the 5 MB mlp's; skipped when there is none)
        planner = SafeLoadPlanner(flatten_sharded_tensors=_holds_sharded_tensor(state_dict), adopt_loaded=adopt)
        dcp.load(state_dict, storage_reader=reader, planner=planner,
                 process_group=group, no_dist=not _distributed())
    return reader.hashed


class DCPError(RuntimeError):
    """A DCP read or write failed (on any rank: DCP reports every rank's failure to all)."""


class CorruptCheckpoint(DCPError):
    """Files of the checkpoint being loaded do not match its manifest (``problems``: one line each)."""

    def __init__(self, message: str, problems: List[str]):
        super().__init__(message)
        self.problems = problems


@contextlib.contextmanager
def _plain_errors(what: str, target: Optional[str] = None) -> Iterator[None]:
    # DCP's CheckpointException derives from BaseException: `except Exception` would miss it.
    try:
        yield
    except CheckpointException as exc:
        errors = {r: (e[0] if isinstance(e, tuple) else e) for r, e in getattr(exc, "failures", {}).items()}
        corrupt = sorted({str(e) for e in errors.values() if isinstance(e, CorruptFile)})
        if corrupt:
            raise CorruptCheckpoint(f"the checkpoint's files do not match its manifest: {'; '.join(corrupt)}",
                                    corrupt) from exc
        causes = "; ".join(f"rank {r}: {type(e).__name__}: {_gist(e)}" for r, e in sorted(errors.items()))
        hint = disk_trouble(target) if target else ""
        raise DCPError(f"torch.distributed.checkpoint failed {what}: {causes or exc}{hint}") from exc


def disk_trouble(path: str) -> str:
    """Name a full or read-only file system under ``path``, or ``""``.

    torch's zip writer reports a failed ``write`` as ``unexpected pos N vs M`` and drops the
    errno; looking at the file system afterwards recovers the cause the user needs to act on.
    """
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        st = os.statvfs(probe or ".")
    except OSError:
        return ""
    if st.f_flag & os.ST_RDONLY:
        return f" [{os.strerror(errno.EROFS)}: {probe}]"
    free = st.f_bavail * st.f_frsize
    if free < _LOW_SPACE:
        return f" [{os.strerror(errno.ENOSPC)}: {free} bytes free on the file system of {probe}]"
    return ""


_LOW_SPACE = 1 << 20


def _gist(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch.load's refusal puts the culprit ("unsupported GLOBAL ...") after a long preamble.
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def tensor_shapes(dcp_dir: str, prefix: str = "model.",
                  metadata: Optional[Metadata] = None) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """``{name: (global shape, dtype)}`` of the tensors under ``prefix`` (prefix stripped)."""
    out = {}
    for key, meta in (metadata or read_metadata(dcp_dir)).state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            out[key[len(prefix):]] = (tuple(meta.size), meta.properties.dtype)
    return out


def load_tensors(dcp_dir: str, prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` (prefix stripped), consolidated (unsharded) on the CPU, in this
    one process, with no process group: for export, inspection and tests, whatever strategy and
    world size wrote the checkpoint. ``prefix="optim."`` gives the optimizer state."""
    template = {prefix + name: torch.empty(shape, dtype=dtype)
                for name, (shape, dtype) in tensor_shapes(dcp_dir, prefix).items()}
    with _plain_errors("reading"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(template, storage_reader=SafeReader(dcp_dir), planner=SafeLoadPlanner(adopt_loaded=True),
                 no_dist=True)  # (a template of its own: loaded tensors may replace its entries)
    return {key[len(prefix):]: value for key, value in template.items()}


def load_full_model(dcp_dir: str) -> Dict[str, torch.Tensor]:
    """The consolidated model weights of a checkpoint: ``{parameter/buffer name: tensor}``."""
    return load_tensors(dcp_dir, "model.")
