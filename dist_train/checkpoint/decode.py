"""What a checkpoint's pickles may build, decoded without running code from the file.

DCP stores two things through pickle: its ``.metadata`` index and each item of a shard file
(every tensor, and every non-tensor leaf such as an optimizer's ``lr`` and ``betas``, is a small
``torch.save`` archive), which its default reader loads with ``torch.load(weights_only=False)``.
Here ``.metadata`` goes through an unpickler that only builds DCP's own metadata classes (and
torch sizes, dtypes, layouts), and every item through ``load_item``: a C unpickler that builds
plain tensors, numbers, strings and containers only, with ``torch.load(weights_only=True)`` for
anything else. A crafted checkpoint cannot run code when it is loaded.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.distributed.checkpoint.metadata import Metadata

from dist_train.checkpoint.encode import memory

_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


#: torch's tensor layouts by name, as ``torch.serialization._get_layout`` maps them (its first call
#: looks through every name torch has: 1-1.5 ms of a process's first resume).
_LAYOUTS = {str(v): v for v in (getattr(torch, n, None) for n in (
    "strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged"))
    if isinstance(v, torch.layout)}


def _get_layout(name: str) -> Any:
    found = _LAYOUTS.get(name)
    return found if found is not None else torch.serialization._get_layout(name)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _get_layout
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a DCP index never holds; "
                                     "refusing to load it")


def read_metadata(dcp_dir: str) -> Metadata:
    """DCP's index of a checkpoint (tensor names, shapes, dtypes, shard locations)."""
    with open(os.path.join(dcp_dir, ".metadata"), "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{dcp_dir}/.metadata is not a DCP Metadata object")
    # DCP opens <dcp_dir>/<relative_path> for each piece: a crafted index could point outside.
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or rel in ("", ".", "..") or os.path.basename(rel) != rel or "\0" in rel:
            raise pickle.UnpicklingError(f"{dcp_dir}/.metadata names the data file {rel!r}, which is not a file "
                                         "of this directory; refusing to load it")
    return metadata


class _NotPlain(Exception):
    """The item is not one plain tensor: torch.load decodes it instead."""


class _StorageType:
    """What a pickle's storage class resolves to: a dtype tag, nothing callable (as in torch's
    weights-only unpickler: a crafted pickle cannot allocate storages of its own choosing)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


# The storage classes a plain tensor's pickle names (``torch.FloatStorage``, ...), by name.
_STORAGE_TYPES = {name: _StorageType(dtype) for name, dtype in {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128}.items()}


class _Loaded:
    """A storage read from the archive, as the persistent id hands it to ``_rebuild_plain``."""

    __slots__ = ("storage", "dtype")

    def __init__(self, storage: Any, dtype: torch.dtype):
        self.storage, self.dtype = storage, dtype


def _rebuild_plain(storage: Any, storage_offset: int, size: Any, stride: Any,
                   requires_grad: bool, hooks: Any, metadata: Any = None) -> torch.Tensor:
    """What ``torch._utils._rebuild_tensor_v2`` builds, for a plain tensor only, lying within its
    storage record (``set_`` would instead grow a resizable storage, as the ones read here are:
    a crafted pickle's tensor would take uninitialised memory, or move the memory of a
    destination tensor its bytes are read into)."""
    if requires_grad or hooks or metadata or not isinstance(storage, _Loaded):
        raise _NotPlain("a tensor with grad, hooks or metadata")
    if not _within(storage.storage.nbytes() // storage.dtype.itemsize, storage_offset, size, stride):
        raise _NotPlain("a tensor reaching outside its storage record")
    return torch.empty(0, dtype=storage.dtype).set_(storage.storage, storage_offset, tuple(size), tuple(stride))


def _within(numel: int, offset: Any, size: Any, stride: Any) -> bool:
    """Whether a tensor of ``size``, ``stride`` at element ``offset`` lies within ``numel``
    elements of storage (all of them plain non-negative ints; an empty tensor anywhere)."""
    if type(offset) is not int or offset < 0 or not isinstance(size, (tuple, list)) \
            or not isinstance(stride, (tuple, list)) or len(size) != len(stride) \
            or any(type(v) is not int or v < 0 for v in (*size, *stride)):
        return False
    return 0 in size or offset + sum((n - 1) * s for n, s in zip(size, stride)) < numel


def _check_plain(obj: Any) -> None:
    """``obj`` is plain data: numbers, strings, bytes, None, plain tensors without grad or hooks
    (a pickle's BUILD opcode can set those on a tensor it built: torch's weights-only unpickler
    refuses that, and so does this path, by handing the item to it), and dicts, ordered dicts,
    lists, tuples and sets of these. Anything else the unpickler could hand out (a class, a
    storage tag, a bare storage) is refused too."""
    seen, todo = set(), [obj]
    while todo:
        item = todo.pop()
        if type(item) in _LEAVES or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if type(item) is not torch.Tensor or item.requires_grad or item._backward_hooks:
                raise _NotPlain("a tensor with grad or hooks")
        elif type(item) in (dict, collections.OrderedDict):
            if getattr(item, "__dict__", None):
                raise _NotPlain("a mapping with attributes")
            for part in (item.keys(), item.values()):
                if not _LEAVES.issuperset(map(type, part)):
                    todo.extend(part)
        elif type(item) in (list, tuple, set, frozenset):
            if not _LEAVES.issuperset(map(type, item)):  # (in C: the RNG states hold 625 ints)
                todo.extend(item)
        else:  # (what else the unpickler can hand out: a class, a storage tag, a bare storage)
            raise _NotPlain(f"a {type(item).__name__}")


#: What needs no look inside (the unpickler builds no subclasses of these).
_LEAVES = frozenset({int, float, bool, complex, str, bytes, bytearray, type(None)})


_TENSOR_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_plain,
                   ("collections", "OrderedDict"): collections.OrderedDict}


class _TensorUnpickler(pickle.Unpickler):
    """The pickle of one tensor as ``torch.save`` writes it, or of numbers, strings and containers
    of them, and nothing else: its only globals are the tensor rebuild function, an (empty)
    OrderedDict of hooks and storage classes (dtype tags, not callable); each persistent id names
    a storage record of the archive; ``_check_plain`` then refuses tensors given grad or hooks.
    A subset of what ``torch.load(weights_only=True)`` allows, decoded by the C unpickler (torch's
    weights-only unpickler is written in Python: about 0.1-0.25 ms per tensor here, most of the
    load time of a checkpoint of small tensors)."""

    def __init__(self, data: Any, fetch: Callable[[str, int], Any]):
        super().__init__(data if isinstance(data, io.BytesIO) else io.BytesIO(data))
        self.fetch = fetch  # (record key, bytes) -> the record's UntypedStorage
        self.storages: Dict[str, Any] = {}  # by record key: tensors that share a storage share it here too

    def find_class(self, module: str, name: str) -> Any:
        found = _TENSOR_GLOBALS.get((module, name))
        if found is None and module == "torch":
            found = _STORAGE_TYPES.get(name)
        if found is None:
            raise _NotPlain(f"{module}.{name}")
        return found

    def persistent_load(self, saved_id: Any) -> Any:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"
                and isinstance(saved_id[1], _StorageType) and isinstance(saved_id[2], str)
                and saved_id[3] == "cpu" and type(saved_id[4]) is int and saved_id[4] >= 0):
            raise _NotPlain("storage")
        _tag, storage_type, key, _location, numel = saved_id
        dtype = storage_type.dtype
        if key not in self.storages:
            self.storages[key] = self.fetch(key, numel * torch._utils._element_size(dtype))
        return _Loaded(self.storages[key], dtype)


def load_item(stream: Any) -> Any:
    """One item DCP stored with ``torch.save`` (a zip archive: the rest of a seekable binary
    stream, or bytes), tensors on the CPU: a tensor, or a non-tensor leaf of the state dict (an
    optimizer's ``lr``, ``betas``, ...).

    A plain tensor (little-endian, CPU storage, no hooks or subclass) or a leaf of numbers,
    strings, tuples, lists and dicts is decoded here: the archive read by torch's own reader
    (straight from the stream into the tensor's storage), its pickle by ``_TensorUnpickler``;
    anything else goes through ``torch.load(weights_only=True)``. Either way no code from the
    file runs."""
    if isinstance(stream, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(stream)
    start = stream.tell()
    try:
        archive = torch._C.PyTorchFileReader(stream)
        if sys.byteorder != "little" or (archive.has_record("byteorder")
                                         and archive.get_record("byteorder") != b"little"):
            raise _NotPlain("byte order")
        fetch = lambda key, nbytes: archive.get_storage_from_record(  # noqa: E731
            f"data/{key}", nbytes, torch.UntypedStorage).untyped_storage()
        obj = _TensorUnpickler(archive.get_record("data.pkl"), fetch).load()
        _check_plain(obj)
        return obj
    except Exception:  # noqa: BLE001  (not plain, or malformed: torch.load decides, and names the problem)
        stream.seek(start)
        return torch.load(stream, map_location="cpu", weights_only=True)


def load_leaf(data: bytes) -> Any:
    """``load_item`` of a non-tensor leaf's archive (its bytes): an optimizer's ``lr``, ``betas``.

    ``torch.save`` writes the pickle first (``<name>/data.pkl``, stored, after a 64-byte local
    header) and then only records that a pickle without tensors never reads (format version,
    byte order, alignment, serialization id). So the pickle is decoded where it starts, by the
    same unpickler, in a few microseconds instead of the zip reader's 20-30; the record's own
    size (its data descriptor, or its local header) must be where the pickle's STOP left off.
    Anything else (a tensor inside, another layout) goes through ``load_item``. The archive's
    other bytes are not looked at here: the manifest's checksum covers every byte of the file."""
    found = _first_record_object(data)
    return load_item(data) if found is _NOT_FOUND else found


def load_tensor_item(stream: Any) -> torch.Tensor:
    """``load_item`` of a tensor item (DCP's tensors are stored one per archive)."""
    tensor = load_item(stream)
    if not isinstance(tensor, torch.Tensor):
        raise RuntimeError(f"a DCP tensor item holds a {type(tensor).__name__}, not a tensor")
    return tensor


class NotPlain(Exception):
    """``read_sequential``: the item is not a plain tensor archive of the expected form."""


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header (30 bytes)
_CENTRAL_ENTRY = struct.Struct("<IHHHHHHIIIHHHHHII")  # a central directory entry (46 bytes)
_END = struct.Struct("<IHHHHIIH")  # the end of central directory record (22 bytes)
_SIGNATURES = {"local": 0x04034B50, "central": 0x02014B50, "end": 0x06054B50}
_TAIL = 1 << 16  # the end of an archive read first (its central directory is a few hundred bytes)
_MAX_RECORD = 1 << 16  # an archive's records other than tensor data are tens of bytes


_NOT_FOUND = object()
_DESCRIPTOR = struct.Struct("<IIII")  # a zip data descriptor: signature, CRC-32, both sizes (32-bit)


def _no_storage(key: str, nbytes: int) -> Any:
    raise _NotPlain("a storage")


def _first_record_object(data: bytes) -> Any:
    if len(data) < _LOCAL_HEADER.size:
        return _NOT_FOUND
    sig, _need, flags, method, _time, _date, _crc, packed, size, name_len, extra_len = _LOCAL_HEADER.unpack_from(data)
    name = bytes(data[_LOCAL_HEADER.size:_LOCAL_HEADER.size + name_len])
    if sig != _SIGNATURES["local"] or method != 0 or flags & 1 or name.count(b"/") != 1 or not name.endswith(b"/data.pkl"):
        return _NOT_FOUND
    start = _LOCAL_HEADER.size + name_len + extra_len
    stream = io.BytesIO(data)
    stream.seek(start)
    try:
        obj = _TensorUnpickler(stream, _no_storage).load()
        _check_plain(obj)
    except Exception:  # noqa: BLE001  (a tensor, or not the plain form: the general way decides)
        return _NOT_FOUND
    length = stream.tell() - start
    if flags & 0x08:  # (sizes in a data descriptor after the data, as torch's writer does)
        if len(data) < start + length + _DESCRIPTOR.size:
            return _NOT_FOUND
        sig, _crc, packed, size = _DESCRIPTOR.unpack_from(data, start + length)
        if sig != 0x08074B50:
            return _NOT_FOUND
    if packed != length or size != length:
        return _NOT_FOUND
    return obj


def _records(tail: bytes, length: int) -> Tuple[Dict[str, Tuple[int, int]], int]:
    """``{record name: (offset of its local header, size)}`` from the central directory in the
    last bytes (``tail``) of an archive of ``length`` bytes, and the directory's offset; NotPlain
    for anything unusual."""
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END.size > len(tail):
        raise NotPlain("no end of central directory")
    _sig, disk, cd_disk, here, total, cd_size, cd_offset, comment = _END.unpack_from(tail, at)
    pos = len(tail) - (length - cd_offset)  # where the central directory starts in ``tail``
    if disk or cd_disk or here != total or at + _END.size + comment != len(tail) or pos < 0 \
            or pos + cd_size > at or cd_offset == 0xFFFFFFFF:
        raise NotPlain("a central directory this reader does not follow")
    out = {}
    for _ in range(total):
        if pos + _CENTRAL_ENTRY.size > at:
            raise NotPlain("a short central directory")
        (sig, _made, _need, _flags, method, _time, _date, _crc, packed, size, name_len, extra_len, comment_len,
         _disk, _internal, _external, offset) = _CENTRAL_ENTRY.unpack_from(tail, pos)
        if sig != _SIGNATURES["central"] or method != 0 or packed != size or 0xFFFFFFFF in (size, offset) \
                or offset >= cd_offset:
            raise NotPlain("a compressed, zip64 or misplaced record")
        name = tail[pos + _CENTRAL_ENTRY.size:pos + _CENTRAL_ENTRY.size + name_len].decode("utf-8", "replace")
        out[name.split("/", 1)[-1]] = (offset, size)  # (without the archive's "archive/" prefix)
        pos += _CENTRAL_ENTRY.size + name_len + extra_len + comment_len
    return out, cd_offset


def _describes(records: Dict[str, bytes], key: str, tensor: torch.Tensor) -> bool:
    """Whether the pickle among ``records`` (read so far) builds exactly ``tensor`` (same storage,
    dtype, shape, strides and offset) from its storage record ``key``."""
    storage = tensor.untyped_storage()

    def fetch(k: str, nbytes: int) -> Any:
        if k != key or nbytes != storage.nbytes():
            raise NotPlain(f"storage {k!r}")
        return storage

    try:
        built = _TensorUnpickler(records["data.pkl"], fetch).load()
    except Exception:  # noqa: BLE001  (no pickle yet, or another one: a new storage it is)
        return False
    return (type(built) is torch.Tensor and built.dtype == tensor.dtype and built.shape == tensor.shape
            and built.stride() == tensor.stride() and built.storage_offset() == tensor.storage_offset()
            and built.untyped_storage().data_ptr() == storage.data_ptr())


def read_sequential(reader: Any, length: int, into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tensor of one DCP item, a ``torch.save`` archive of ``length`` bytes, read from start to
    end from ``reader`` (a ``checksum.HashingReader``): each record in file order, the tensor's
    bytes straight into its storage, so that every byte is read once and hashed on the way.

    The records' places and sizes come from the archive's central directory, at its end, read
    ahead of the rest (``reader.peek``) and compared with the same bytes when the sequential read
    reaches them. Only the plain form is decoded here: stored (uncompressed) records, little-endian,
    one plain tensor built by ``_TensorUnpickler`` (no code from the file runs). Anything else
    raises ``NotPlain`` (the reader is then somewhere inside the item: the caller decodes it
    another way and reads on to its end).

    ``into``: a tensor whose memory the bytes are read into, instead of a new storage, when the
    archive's pickle (which ``torch.save`` writes before the data) describes exactly that tensor:
    its one storage, dtype, shape, strides and offset (the tensor returned is then a view of
    ``into``'s storage)."""
    start = reader.pos
    end = start + length
    tail = reader.peek(end - min(length, _TAIL), min(length, _TAIL))
    records, directory = _records(tail, length)
    small: Dict[str, bytes] = {}
    storages: Dict[str, Any] = {}
    if sum(name.startswith("data/") for name in records) != 1:
        into = None
    for name, (offset, size) in sorted(records.items(), key=lambda kv: kv[1][0]):
        if start + offset < reader.pos or offset + _LOCAL_HEADER.size > directory:
            raise NotPlain("overlapping records")
        reader.skip_to(start + offset)
        signature, *_rest, name_len, extra_len = _LOCAL_HEADER.unpack(reader.read(_LOCAL_HEADER.size))
        if signature != _SIGNATURES["local"] or reader.pos + name_len + extra_len + size > start + directory:
            raise NotPlain("a local header out of place")
        reader.skip_to(reader.pos + name_len + extra_len)
        if name.startswith("data/"):
            key = name[len("data/"):]
            storage = into.untyped_storage() if into is not None else None
            if storage is None or size != storage.nbytes() or not _describes(small, key, into):
                storage = torch.UntypedStorage(size)
            if size:
                reader.readinto(memory(storage))
            storages[key] = storage
        elif size <= _MAX_RECORD:
            small[name] = reader.read(size)
        else:
            raise NotPlain(f"a {size}-byte record {name!r}")
    reader.skip_to(start + directory)
    if reader.read(length - directory) != tail[len(tail) - (length - directory):]:
        raise NotPlain("the end of the archive changed while it was read")
    if sys.byteorder != "little" or small.get("byteorder", b"little") != b"little" or "data.pkl" not in small:
        raise NotPlain("byte order, or no data.pkl")

    def fetch(key: str, nbytes: int) -> Any:
        storage = storages.get(key)
        if storage is None or storage.nbytes() != nbytes:
            raise NotPlain(f"storage {key!r}")
        return storage

    try:
        obj = _TensorUnpickler(small["data.pkl"], fetch).load()
        _check_plain(obj)
    except NotPlain:
        raise
    except Exception as exc:  # noqa: BLE001  (not plain, or malformed: the caller's other way names the problem)
        raise NotPlain(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, torch.Tensor):
        raise NotPlain(f"a {type(obj).__name__}, not a tensor")
    return obj


class MemoryReader:
    """The reading side of ``checksum.HashingReader`` over an item already read into memory (and
    hashed there), for ``read_sequential``; ``spans`` records where each ``readinto`` read (the
    tensor's storage bytes)."""

    def __init__(self, data: Any):
        self.data = memoryview(data).cast("B")
        self.pos = 0
        self.spans: list = []

    def read(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n].tobytes()
        if len(out) != n:
            raise EOFError(f"the item ends at byte {len(self.data)}, {n - len(out)} bytes early")
        self.pos += n
        return out

    def readinto(self, view: memoryview) -> None:
        n = len(view)
        if self.pos + n > len(self.data):
            raise EOFError(f"the item ends at byte {len(self.data)}, {self.pos + n - len(self.data)} bytes early")
        view[:] = self.data[self.pos:self.pos + n]
        self.spans.append((self.pos, n))
        self.pos += n

    def peek(self, offset: int, n: int) -> bytes:
        out = self.data[offset:offset + n].tobytes()
        if len(out) != n:
            raise EOFError(f"the item ends before byte {offset + n}")
        return out

    def skip_to(self, offset: int) -> None:
        if offset < self.pos:
            raise ValueError(f"cannot read back to byte {offset} (at {self.pos}): reads are sequential")
        self.pos = min(offset, len(self.data))


# Small items' archives by layout, learned from items decoded here: (dtype, shape) of a contiguous
# tensor -> (the archive's bytes before its storage bytes, those after). See ``read_small_item``.
_layouts: Dict[Tuple[torch.dtype, Tuple[int, ...]], Tuple[bytes, bytes]] = {}
_MAX_LAYOUTS = 4096  # beyond, the cache starts over


def small_item(data: Any, into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tensor of one small DCP item held in memory (``data``, the whole archive): decoded by
    ``read_sequential`` (its bytes into ``into`` when the pickle describes exactly that tensor,
    else into a new storage), or by ``load_tensor_item`` when it is not the plain form. A plain
    contiguous tensor's archive teaches ``read_small_item`` its layout's bytes around the data."""
    mem = MemoryReader(data)
    try:
        tensor = read_sequential(mem, len(mem.data), into)
    except NotPlain:
        return load_tensor_item(bytes(data))
    if (len(mem.spans) == 1 and tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.nbytes == mem.spans[0][1] > 0):
        start, n = mem.spans[0]
        if len(_layouts) >= _MAX_LAYOUTS:
            _layouts.clear()
        _layouts[(tensor.dtype, tuple(tensor.shape))] = (mem.data[:start].tobytes(), mem.data[start + n:].tobytes())
    return tensor


def read_small_item(reader: Any, length: int, into: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tensor of one small DCP item of ``length`` bytes read from ``reader`` (a
    ``checksum.HashingReader``), read straight into ``into`` (a contiguous CPU tensor that owns its
    memory, the item's destination) when the item's bytes around its data are those of an item of
    the same layout decoded before (``small_item``): the head compared, the data read into
    ``into``'s memory, the tail compared. Equal bytes there mean the same records, directory and
    pickle, so the same tensor layout with these data bytes: no zip reader or unpickler needed
    (20-40 us of a small item's load). Else the item is read into memory and decoded by
    ``small_item`` (also into ``into`` where it can). Returns ``into`` or a new tensor."""
    known = _layouts.get((into.dtype, tuple(into.shape))) if into is not None else None
    if known is None or len(known[0]) + into.nbytes + len(known[1]) != length:
        data = bytearray(length)
        reader.readinto(memoryview(data))
        return small_item(data, into)
    head, tail = known
    got = reader.read(len(head))
    if got != head:
        return small_item(bytearray(got) + reader.read(length - len(head)), into)
    view = memory(into.untyped_storage())
    reader.readinto(view)
    end = reader.read(len(tail))
    return into if end == tail else small_item(bytearray(got) + view.tobytes() + end, into)
