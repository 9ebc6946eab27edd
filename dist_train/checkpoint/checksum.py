"""Checksums of checkpoint files: taken while the bytes are written, checked when they are read.

Manifests (format 2) record ``{"size", "xxh3_128"}`` per file. XXH3-128 is not a cryptographic hash
(it guards against corruption, not against an attacker who can rewrite the manifest too, which
SHA-256 in the same manifest would not stop either), but any flipped byte changes it, and it runs
at memory speed (about 10x SHA-256), so hashing costs a small fraction of writing the bytes.
Format-1 manifests recorded ``sha256``: their files are still checked with SHA-256. Format-2
manifests get each file's ``sha256`` too, after the commit, for outside tools (``digest.py``);
verification uses the ``xxh3_128`` beside it.

Writers that see every byte of a file (the DCP writer in ``storage.py``, ``layout.write_atomic``)
hash it on the way out and ``record`` the digest here; ``recorded`` hands it to
``layout.describe_files`` so the file is not read back. A recorded digest is used only while the
file on disk is the one it was taken from (same inode, size and modification time); otherwise the
file is simply read and hashed, so a stale record costs time, never correctness.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import threading
from typing import Any, Callable, Dict, Optional, Tuple

import xxhash

ALGORITHM = "xxh3_128"
SYNCED = "synced"  # in-memory flag of a describe_files entry: the writer fsynced the file already
_ALGORITHMS: Dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
_CHUNK = 1 << 20  # files are hashed in chunks of this size
_GATHER = 1 << 20  # HashingFile hands the file writes smaller than this in chunks of this size
_WRITEBACK = 4 << 20  # HashingFile starts the disk write of its file every this many bytes
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    """libc's ``sync_file_range`` (Linux), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_MAX_RECORDS = 100_000  # records of abandoned saves are dropped oldest-first beyond this

_lock = threading.Lock()
_records: Dict[str, Tuple[Tuple[int, int, int], dict]] = {}


def new_hasher() -> Any:
    return _ALGORITHMS[ALGORITHM]()


def make_entry(size: int, hasher: Any) -> dict:
    return {"size": size, ALGORITHM: hasher.hexdigest()}


def hash_file(path: str, algorithm: str = ALGORITHM, *more: str) -> dict:
    """``{"size", algorithm: hex digest}`` of a file (with ``more`` algorithms: each one's digest
    too, from the same read), read in chunks into a buffer this thread keeps (a fresh 8 MB buffer
    per file cost ~0.8 ms of zero-filling: most of a small checkpoint's verification)."""
    hashers = {a: _ALGORITHMS[a]() for a in (algorithm, *more)}
    buf = getattr(_read_buffer, "buf", None)
    if buf is None:
        buf = _read_buffer.buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            for h in hashers.values():
                h.update(view[:n])
            size += n
    return {"size": size, **{a: h.hexdigest() for a, h in hashers.items()}}


_read_buffer = threading.local()


def algorithm_of(entry: dict) -> Optional[str]:
    """The checksum a manifest entry holds (the newest known one), else None."""
    return next((a for a in _ALGORITHMS if a in entry), None)


def check_file(path: str, entry: dict) -> Optional[str]:
    """None when the file's checksum matches its manifest entry, else what is wrong."""
    algorithm = algorithm_of(entry)
    return mismatch(hash_file(path, algorithm) if algorithm else {}, entry)


def mismatch(found: dict, entry: dict) -> Optional[str]:
    """None when ``found`` (``{"size", algorithm: digest}`` of a file as read) is what the manifest
    ``entry`` records, else what is wrong."""
    algorithm = algorithm_of(entry)
    if algorithm is None:
        return f"no checksum in the manifest (expected one of {', '.join(_ALGORITHMS)})"
    if found.get("size") != entry.get("size"):
        return f"size {found.get('size')} != {entry.get('size')} in the manifest (truncated or overwritten)"
    digest, expected = str(found.get(algorithm)), str(entry[algorithm])
    if digest != expected:
        return f"{algorithm} {digest[:12]}... != {expected[:12]}... in the manifest (corrupt)"
    return None


# --- digests taken while writing -----------------------------------------------------------------

def _identity(path: str) -> Tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def record(path: str, entry: dict, synced: bool) -> None:
    """Remember the digest of a file just written (and closed) by this process."""
    value = dict(entry, **({SYNCED: True} if synced else {}))
    key = os.path.abspath(path)
    ident = _identity(path)
    with _lock:
        _records.pop(key, None)
        _records[key] = (ident, value)
        while len(_records) > _MAX_RECORDS:
            del _records[next(iter(_records))]


def moved(old: str, new: str) -> None:
    """A recorded file was renamed (the identity check survives a rename)."""
    with _lock:
        rec = _records.pop(os.path.abspath(old), None)
        if rec is not None:
            _records[os.path.abspath(new)] = rec


def forget(root: str) -> None:
    """Drop the records of files under ``root`` (a staging dir whose manifest is written)."""
    prefix = os.path.join(os.path.abspath(root), "")
    with _lock:
        for key in [k for k in _records if k.startswith(prefix)]:
            del _records[key]


def recorded(path: str) -> Optional[dict]:
    """The digest recorded for ``path`` (consumed), if the file is still the one it was taken of."""
    with _lock:
        rec = _records.pop(os.path.abspath(path), None)
    if rec is None:
        return None
    try:
        same = _identity(path) == rec[0]
    except OSError:
        return None
    return dict(rec[1]) if same else None


class HashingFile:
    """A binary file being written, hashed as its bytes go out.

    Small writes are gathered in a buffer and handed to the file (and the hasher) in chunks of
    ``_GATHER`` bytes: DCP's shard writer issues about 25 writes per tensor (zip headers and
    padding of tens of bytes), and one system call plus one hash update for each cost more than the
    bytes themselves. Large writes go straight through. ``tell`` counts the bytes accepted, so
    offsets stay right with bytes still in the buffer; ``flush`` and ``close`` empty it.

    Every ``_WRITEBACK`` bytes, the kernel is asked to start writing the file's new pages to disk
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)`` on Linux, which does not wait): the disk then works
    while the rest of the checkpoint is serialized, and the fsync at the commit waits only for the
    tail instead of the whole file.

    Only sequential writes can be hashed on the way: a ``seek`` or ``truncate`` marks the digest
    invalid (the file is then read back and hashed instead). Everything else is the file's own.
    """

    def __init__(self, raw: Any):
        self.raw = raw
        self.hasher = new_hasher()
        self.size = 0  # bytes accepted (written or buffered)
        self.valid = True
        self._buf = bytearray()
        self._emitted = 0  # bytes handed to the file (the rest of ``size`` is in the buffer)
        self._flushed = 0  # bytes whose writeback has been started

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if len(self._buf) + n < _GATHER:
            self._buf += view
            self.size += n
        else:
            self._drain()
            self._emit(view)
            self.size += n
        return n

    def _start_writeback(self) -> None:
        """Start (not wait for) the disk write of everything handed to the file so far."""
        if _sync_file_range is None:
            return
        try:
            self.raw.flush()
            fd = self.raw.fileno()
        except (AttributeError, OSError, ValueError):
            return
        # (should the file system refuse, the commit's fsync writes these pages as usual)
        _sync_file_range(fd, self._flushed, self._emitted - self._flushed, _SYNC_FILE_RANGE_WRITE)
        self._flushed = self._emitted

    def _emit(self, view: Any) -> None:
        written = self.raw.write(view)
        if written is None or written != len(view):
            # (a partial write of a non-blocking stream) the rest is written, but not hashed on the way
            self.valid = False
            rest = view[written or 0:]
            while len(rest):
                rest = rest[self.raw.write(rest) or 0:]
        else:
            self.hasher.update(view)
        self._emitted += len(view)
        if self._emitted - self._flushed >= _WRITEBACK:
            self._start_writeback()

    def _drain(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._emit(memoryview(buf))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def tell(self) -> int:
        return self.raw.tell() + len(self._buf) if not self.valid else self.size

    def flush(self) -> None:
        self._drain()
        self.raw.flush()

    def close(self) -> None:
        if not self.raw.closed:
            self._drain()
        self.raw.close()

    def seek(self, *args: Any) -> int:
        self._drain()
        self.valid = False
        return self.raw.seek(*args)

    def truncate(self, *args: Any) -> int:
        self._drain()
        self.valid = False
        return self.raw.truncate(*args)

    def entry(self) -> Optional[dict]:
        """The file's manifest entry, or None when it could not be hashed on the way."""
        self._drain()
        return make_entry(self.size, self.hasher) if self.valid else None

    def __getattr__(self, name: str) -> Any:  # fileno, closed, writable, ...
        return getattr(self.raw, name)

    def __enter__(self) -> "HashingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class HashingReader:
    """A binary file read from start to end, every byte hashed on the way (``finish`` reads what
    is left and gives the file's ``{"size", algorithm: digest}``).

    A checkpoint's DCP shard files are read through this while they are loaded, so a resume reads
    each of them once instead of hashing it before the load and reading it again for it. Reads
    are sequential only; ``skip_to`` reads (and hashes) the bytes up to an offset. A short read (the
    file ended early) raises ``EOFError``."""

    def __init__(self, stream: Any, algorithm: str = ALGORITHM):
        self.stream = stream
        self.algorithm = algorithm
        self.hasher = _ALGORITHMS[algorithm]()
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self.hasher.update(data)
        self.pos += len(data)
        if len(data) != n:
            raise EOFError(f"the file ends at byte {self.pos}, {n - len(data)} bytes early")
        return data

    def readinto(self, view: memoryview) -> None:
        """Fill all of ``view`` (bytes) from the file, hashing each chunk while it is in cache."""
        done, total = 0, len(view)
        while done < total:
            chunk = view[done:min(total, done + _CHUNK)]
            n = self.stream.readinto(chunk)
            if not n:
                raise EOFError(f"the file ends at byte {self.pos}, {total - done} bytes early")
            self.hasher.update(chunk[:n])
            self.pos += n
            done += n

    def peek(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``, read out of order (not hashed; the file position stays)."""
        data = os.pread(self.stream.fileno(), n, offset)
        if len(data) != n:
            raise EOFError(f"the file ends before byte {offset + n}")
        return data

    def skip_to(self, offset: int) -> None:
        """Read (and hash) the bytes up to ``offset`` (no further than the end of the file)."""
        if offset < self.pos:
            raise ValueError(f"cannot read back to byte {offset} (at {self.pos}): reads are sequential")
        buf = getattr(_read_buffer, "buf", None)
        if buf is None:
            buf = _read_buffer.buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while self.pos < offset:
            n = self.stream.readinto(view[:min(_CHUNK, offset - self.pos)])
            if not n:
                return
            self.hasher.update(view[:n])
            self.pos += n

    def finish(self) -> dict:
        """Read (and hash) the rest of the file: the whole file's ``{"size", algorithm: digest}``."""
        self.skip_to(1 << 62)
        return {"size": self.pos, self.algorithm: self.hasher.hexdigest()}
