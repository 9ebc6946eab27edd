"""DCP's items written fast, byte for byte as ``torch.save`` writes them.

DCP stores every tensor, and every non-tensor leaf (an optimizer's ``lr``, ``betas``, ...), as its
own small ``torch.save`` archive inside a shard file. A ``torch.save`` costs 0.04-0.1 ms of Python
and zip bookkeeping whatever the size: a 5 MB model + AdamW state of 37 items paid more for that
than for its bytes. Both writers here produce exactly the bytes ``torch.save`` would (checked
against it by the tests), so the stock ``dcp.load`` / ``torch.load`` read them as always:

- a tensor's archive is the same for every tensor of the same dtype, shape and strides except for
  the tensor's bytes (with the zip CRC32s off, as the shard writer has them: ``storage.
  _no_zip_crc``). The archive of a zero tensor of that layout is made once (``torch.save``),
  cut around its data, and each item is then that head, the tensor's own storage bytes (no
  copy), and that tail. (One exception to "byte for byte": torch's serialization id, 40 digits
  in the last record, differs when a storage starts with the bytes ``PK\x07\x08``; the
  template's is that of zeros. Readers do not look at it.) Only plain dense CPU tensors up to ``_TEMPLATE_BYTES``
  take this way (a larger one's fixed cost is small next to its bytes, and making its template
  would cost a save); anything else (a subclass, a conjugate view, a tensor with Python
  attributes) is written by ``torch.save``.
- a non-tensor leaf of plain Python values (numbers, strings, booleans, None, tuples and lists of
  them) has the same archive whenever its pickle is the same: archives are kept by pickle.

Reading needs no ``torch.save``: ``decode.py`` learns the bytes around a small item's data from
the items it decodes, by layout, and reads later items of that layout straight into their
destinations when those bytes are equal (``decode.read_small_item``).
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import io
import os
import pickle
import struct
import threading
import zipfile
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.serialization import config

_TEMPLATE_BYTES = 1 << 20  # tensors up to this size are written from a template
_MAX_TEMPLATES = 4096  # layouts (dtype, shape, strides) kept; beyond, the cache starts over
_MAX_OBJECTS = 1024  # non-tensor archives kept (an ``lr`` that changes every step would grow it)
_MAX_OBJECT_KEY = 4096  # ... and only of values whose pickle is at most this long
_PLAIN = (int, float, bool, str, bytes, type(None))

_templates: Dict[Tuple[Any, ...], Tuple[bytes, bytes, int]] = {}
_objects: Dict[bytes, bytes] = {}
_lock = threading.Lock()


def write_tensor(stream: Any, tensor: torch.Tensor) -> None:
    """Write ``torch.save(tensor)`` to ``stream``: the same bytes, the template way where it
    applies (only while torch.save's CRC32s are off on this thread, as in the shard writer)."""
    parts = _template(tensor)
    if parts is None:
        torch.save(tensor, stream)
        return
    head, tail = parts
    stream.write(head)
    storage = tensor.untyped_storage()
    if storage.nbytes():
        stream.write(memory(storage))
    stream.write(tail)


def memory(storage: torch.UntypedStorage) -> memoryview:
    """The bytes of a CPU storage, as a writable byte view of its memory (no copy)."""
    return memoryview((ctypes.c_char * storage.nbytes()).from_address(storage.data_ptr())).cast("B")


def _settings_per_thread() -> bool:
    """Whether torch's serialization settings are per thread (a ContextVar behind each; torch
    2.14) or one for the whole process (torch 2.11 and older)."""
    entry = getattr(config, "_config", {}).get("save.compute_crc32")
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


_PER_THREAD = _settings_per_thread()
_crc_lock = threading.Lock()
_crc_writers = 0              # (process-wide settings) threads inside no_zip_crc now
_crc_outside: bool = True     # (process-wide settings) the setting before the first of them entered


@contextlib.contextmanager
def no_zip_crc() -> Iterator[None]:
    """``torch.save``'s zip CRC32s off while this thread writes. Where torch's settings are per
    thread, each writer thread switches its own off and back. Where they are one for the process
    (older torch), writer threads overlap: the first to enter keeps the caller's setting and the
    last to leave puts it back, so that a user's own ``torch.save`` never keeps CRC32s off."""
    global _crc_writers, _crc_outside
    if _PER_THREAD:
        before = config.save.compute_crc32
        config.save.compute_crc32 = False
        try:
            yield
        finally:
            config.save.compute_crc32 = before
        return
    with _crc_lock:
        if _crc_writers == 0:
            _crc_outside = config.save.compute_crc32
        _crc_writers += 1
        config.save.compute_crc32 = False
    try:
        yield
    finally:
        with _crc_lock:
            _crc_writers -= 1
            if _crc_writers == 0:
                config.save.compute_crc32 = _crc_outside


def object_archive(obj: Any) -> io.BytesIO:
    """``torch.save(obj)`` into a fresh ``BytesIO`` (what DCP's planner makes of a non-tensor
    leaf), taken from the cache when ``obj`` is plain data already seen."""
    key = (pickle.dumps((config.save.compute_crc32, config.save.storage_alignment, obj), protocol=2)
           if _is_plain(obj) else None)
    if key is not None and len(key) > _MAX_OBJECT_KEY:
        key = None  # (a large blob is not kept: one that changes every save would pile up)
    if key is not None:
        cached = _objects.get(key)
        if cached is not None:
            return io.BytesIO(cached)
    buf = io.BytesIO()
    torch.save(obj, buf)
    if key is not None:
        with _lock:
            if len(_objects) >= _MAX_OBJECTS:
                _objects.clear()
            _objects[key] = buf.getvalue()
    return buf


def _is_plain(obj: Any, depth: int = 0) -> bool:
    if type(obj) in _PLAIN:
        return True
    if type(obj) in (tuple, list) and depth < 4:
        return all(_is_plain(x, depth + 1) for x in obj)
    return False


def _template(tensor: torch.Tensor) -> Optional[Tuple[bytes, bytes]]:
    """The archive's bytes before and after the tensor's data, or None where the template way
    does not apply."""
    if (type(tensor) is not torch.Tensor or tensor.layout != torch.strided or tensor.device.type != "cpu"
            or tensor.requires_grad or tensor.is_conj() or tensor.is_neg() or tensor.is_quantized
            or tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() > _TEMPLATE_BYTES
            or tensor.untyped_storage().nbytes() != tensor.nbytes
            or tensor.__dict__ or torch._utils.get_tensor_metadata(tensor)):
        return None
    key = (tensor.dtype, tuple(tensor.shape), tensor.stride(), config.save.storage_alignment)
    template = _cached(key, lambda: _make_template(tensor))
    if template is None:
        return None
    head, tail, nbytes = template
    # A tensor whose elements overlap (an expanded view) has a larger storage than a fresh tensor
    # of its layout: torch.save writes all of it, so the template does not fit.
    return (head, tail) if nbytes == tensor.untyped_storage().nbytes() else None


def _cached(key: Tuple[Any, ...], make: Callable[[], Optional[Tuple[bytes, bytes, int]]]) -> Optional[Tuple[bytes, bytes, int]]:
    """The template of layout ``key``, made by ``make`` the first time (None: there is none)."""
    template = _templates.get(key)
    if template is None:
        template = make()
        if template is None:
            return None
        with _lock:
            if len(_templates) >= _MAX_TEMPLATES:
                _templates.clear()
            _templates[key] = template
    return template


def _make_template(tensor: torch.Tensor) -> Optional[Tuple[bytes, bytes, int]]:
    """(head, tail, storage bytes) of the archive of a blank tensor of ``tensor``'s layout; None
    while torch.save computes CRC32s (the data's would be the blank tensor's)."""
    # Zeros, not whatever the allocator hands out: torch writes a serialization id whose digits
    # can depend on the data even with CRC32s off (seen with a freed archive's bytes, "PK\x07\x08",
    # at the start of the storage), and a template's bytes must be the same in every process.
    blank = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype).zero_()
    buf = io.BytesIO()
    torch.save(blank, buf)
    raw = buf.getvalue()
    archive = zipfile.ZipFile(io.BytesIO(raw))
    data = [info for info in archive.infolist() if "/data/" in info.filename]
    nbytes = blank.untyped_storage().nbytes()
    if len(data) != 1 or data[0].file_size != nbytes or data[0].compress_type != zipfile.ZIP_STORED:
        raise RuntimeError(f"torch.save wrote an archive of unexpected layout for a {tensor.dtype} tensor of "
                           f"shape {tuple(tensor.shape)}: {[i.filename for i in archive.infolist()]}")
    if any(info.CRC for info in archive.infolist()):
        return None
    name_len, extra_len = struct.unpack_from("<HH", raw, data[0].header_offset + 26)
    start = data[0].header_offset + 30 + name_len + extra_len
    return raw[:start], raw[start + nbytes:], nbytes


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
