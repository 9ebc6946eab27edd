"""The on-disk layout of checkpoints, and the filesystem steps that make a commit atomic.

    <run.dir>/checkpoints/
        step_00000120/              one complete checkpoint (complete = manifest.json exists)
            manifest.json           every other file: relative path -> {"size", "xxh3_128"} (and
                                    "sha256", added after the commit: digest.py)
            meta.json               step, data position, strategy, world size, config, ... (rank 0)
            dcp/                    model (+ optimizer) as torch.distributed.checkpoint shards
            native/                 an engine's own files (DeepSpeed), when it has them
            rng/rank_00000.pt       every rank's RNG states (tensors and numbers only)
        latest                      text: the name of the newest complete checkpoint
        .staging_step_00000150/     being written; never loaded; removed at the next start

A commit is: write manifest.json; fsync it, every file and directory of the staging dir and the
staging dir itself, all at once (one barrier: the filesystem's journal takes the concurrent
fsyncs together; in a multi-rank save each rank fsyncs the files it wrote, as a network filesystem
flushes a file only from the client that wrote it, and rank 0 the manifest and the directories);
then rename the staging dir to ``step_XXXXXXXX``, replace ``latest`` by a rename, and fsync
``checkpoints/`` (the second barrier, once for both renames). A crash before the directory rename
is durable leaves only a staging dir (the previous checkpoint is untouched); after it, the new
checkpoint is complete even if ``latest`` still names the previous one or is empty (resume scans
the directories and does not trust ``latest`` alone, which is why ``latest`` needs no fsync of
its own).

Checksums (``checksum.py``) are taken while files are written wherever the writer sees every
byte (DCP shards, JSON files), so a save reads nothing back; other files are hashed after writing.

Nothing here imports torch.distributed: these are plain, single-process file operations.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, TypeVar

from dist_train.checkpoint import checksum

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
DCP_DIR = "dcp"
NATIVE_DIR = "native"
RNG_DIR = "rng"
STAGING_PREFIX = ".staging_"
DELETING_PREFIX = ".deleting_"
# Format 2: manifest entries hold "xxh3_128" (format 1: "sha256"; still read and verified).
FORMAT = "dist_train.checkpoint/2"
READABLE_FORMATS = ("dist_train.checkpoint/1", FORMAT)

_STEP_RE = re.compile(r"^step_(\d{8})$")
# Held while a committed checkpoint directory is renamed (a prune, a commit over the same step,
# setting one aside) or its manifest replaced (``digest.py``): never both at once.
NAMES = threading.Lock()
_THREADS = 4  # files hashed at once
_SYNC_THREADS = 16  # files fsynced at once (concurrent fsyncs share the journal's commits)
_INLINE_BYTES = 16 << 20  # fewer bytes than this are hashed on the calling thread
T = TypeVar("T")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> Optional[int]:
    """The step of a committed checkpoint directory name, else None."""
    m = _STEP_RE.match(os.path.basename(os.path.normpath(name)))
    return int(m.group(1)) if m else None


def staging_name(step: int) -> str:
    return STAGING_PREFIX + step_name(step)


def rng_file(rank: int) -> str:
    return os.path.join(RNG_DIR, f"rank_{rank:05d}.pt")


# --- durable writes -------------------------------------------------------------------------

def fsync_file(path: str) -> None:
    """fsync a file (or a directory) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory, so the names created, renamed or removed in it survive a crash."""
    fsync_file(path)


def write_atomic(path: str, text: str, sync_file: bool = True) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename, then fsync the
    directory (its digest is recorded, so a manifest does not read it back). ``sync_file=False``
    skips the temporary file's own fsync: for a file whose readers cope with finding it empty or
    old after a crash (``latest``), it saves one of the two flushes."""
    tmp = f"{path}.tmp{os.getpid()}"
    data = text.encode("utf-8")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync_file:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave no temporary file behind, and the old file as it was
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    hasher = checksum.new_hasher()
    hasher.update(data)
    checksum.record(path, checksum.make_entry(len(data), hasher), synced=sync_file)


def write_json_atomic(path: str, payload: dict) -> None:
    """Standard JSON (a NaN or infinite number, which Python would write as NaN / Infinity and other
    parsers refuse, becomes null: summary.json's train_loss after a skipped non-finite last step)."""
    write_atomic(path, json.dumps(_finite(payload), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_staged(path: str, data: bytes) -> None:
    """Write a file of a staging dir: no temporary file and no fsync of its own (the staging dir
    is never loaded; ``write_manifest`` fsyncs its files together before the commit). Its digest
    is recorded, so the manifest does not read it back."""
    with open(path, "wb") as f:
        f.write(data)
    hasher = checksum.new_hasher()
    hasher.update(data)
    checksum.record(path, checksum.make_entry(len(data), hasher), synced=False)


def json_bytes(payload: dict) -> bytes:
    """How every JSON file of a checkpoint is written: keys sorted, the first two levels one
    entry per line (meta.json's sections, the manifest's files), deeper values on their entry's
    line. (json's own ``indent`` takes its pure-Python encoder: 0.3-0.5 ms per save for meta.json's
    config; this one encodes each value with the C encoder.)"""
    return (_json_text(payload, 0) + "\n").encode("utf-8")


def _json_text(value: Any, depth: int) -> str:
    if not (isinstance(value, dict) and value and depth < 2 and all(isinstance(k, str) for k in value)):
        return json.dumps(value, sort_keys=True)
    pad = "  " * (depth + 1)
    entries = ",\n".join(f"{pad}{json.dumps(k)}: {_json_text(value[k], depth + 1)}" for k in sorted(value))
    return "{\n" + entries + "\n" + "  " * depth + "}"


# --- manifest ---------------------------------------------------------------------------------

def list_files(root: str) -> List[str]:
    """Every regular file under ``root`` as a sorted relative path, the manifest excluded."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def parallel(fn: Callable[[Any], T], items: Sequence[Any], threads: int = _THREADS) -> List[T]:
    """``[fn(x) for x in items]`` on up to ``threads`` threads at once (this one included): file
    reads, fsyncs, XXH3 and tensor copies release the GIL, so several files are read (or flushed,
    or loaded) at once. One item, or a call from one of these threads, runs inline. Every item is
    run; the exception of the first item that raised one is raised here. A KeyboardInterrupt (or
    SystemExit) stops the handing out of items, waits for those being worked on, and is raised.

    The threads are kept between calls (``_pool``): starting one cost 0.3 ms here, and a save
    used to start six or seven."""
    items = list(items)
    if len(items) <= 1 or getattr(_in_pool, "yes", False):
        return [fn(x) for x in items]
    results: List[Any] = [None] * len(items)
    errors: Dict[int, Exception] = {}
    todo = iter(range(len(items)))
    stop = [False]
    lock = threading.Lock()

    def work(in_pool: bool = True) -> None:
        _in_pool.yes = in_pool
        while True:
            with lock:
                i = None if stop[0] else next(todo, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except Exception as exc:  # noqa: BLE001  (raised in the caller's thread)
                errors[i] = exc
            except BaseException:
                stop[0] = True
                raise

    helpers = [_pool().submit(work) for _ in range(min(threads, len(items), _POOL_THREADS) - 1)]
    try:
        work(in_pool=False)  # this thread takes items too
    finally:
        with lock:
            stop[0] = True
        started = [h for h in helpers if not h.cancel()]  # (one still queued is not waited for)
        wait(started)
    for h in started:
        h.result()  # (a helper's KeyboardInterrupt / SystemExit)
    if errors:
        raise errors[min(errors)]
    return results


_POOL_THREADS = _SYNC_THREADS  # the most threads any caller asks for
_pool_lock = threading.Lock()
_executor: Optional[ThreadPoolExecutor] = None
_in_pool = threading.local()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _pool_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_POOL_THREADS, thread_name_prefix="checkpoint-io")
        return _executor


def _forget_pool() -> None:
    """(in a forked child: the parent's threads are not there, nor a lock one of them held)"""
    global _pool_lock, _executor, NAMES
    _pool_lock = threading.Lock()
    _executor = None
    NAMES = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def describe_files(root: str, rel_paths: Iterable[str]) -> Dict[str, dict]:
    """``{rel: {"size", "xxh3_128"}}`` for the given files (each rank describes its share).

    A file this process wrote through a hashing writer (``checksum.record``) is described from the
    digest taken while its bytes were written; any other file is read back and hashed, several
    at a time. Entries of files known to be fsynced already carry ``SYNCED`` (``write_manifest``
    skips their fsync and strips the flag).
    """
    rel_paths = list(rel_paths)
    known = {rel: checksum.recorded(os.path.join(root, rel)) for rel in rel_paths}
    todo = [rel for rel in rel_paths if known[rel] is None]
    for rel, entry in zip(todo, parallel(lambda r: checksum.hash_file(os.path.join(root, r)), todo)):
        known[rel] = entry
    return known


def read_manifest(ckpt: str) -> dict:
    """The parsed manifest; raises ValueError with a readable reason when missing or malformed."""
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError("no manifest.json (an incomplete or foreign directory)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"manifest.json is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS \
            or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"manifest.json is not a {FORMAT} manifest")
    root = os.path.realpath(ckpt)
    plain_dirs: Set[str] = set()
    for rel, entry in manifest["files"].items():
        problem = _bad_entry(root, rel, entry, plain_dirs)
        if problem:
            raise ValueError(f"manifest.json lists {rel!r}, {problem}: refusing the whole checkpoint")
    return manifest


# Hex digests by checksum: xxh3_128 (format 2) is 32 hex digits, sha256 (format 1) 64.
_DIGEST_RE = {"xxh3_128": re.compile(r"^[0-9a-f]{32}$"), "sha256": re.compile(r"^[0-9a-f]{64}$")}


def _bad_entry(root: str, rel: str, entry: object, plain_dirs: Set[str]) -> Optional[str]:
    """Why one manifest entry cannot be trusted, else None. Every listed file is later stat-ed and
    hashed: a path that leaves the checkpoint directory (``../``, absolute, or through a symbolic
    link) would make verification read files outside it. ``root``: the checkpoint's real path;
    ``plain_dirs``: directories under it already found not to be links (shared by the entries)."""
    if not rel or rel == "." or "\0" in rel or os.path.isabs(rel) or os.path.normpath(rel) != rel \
            or rel.split(os.sep)[0] == "..":
        return "which is not a plain relative path inside the checkpoint"
    if not (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
            and any(isinstance(entry.get(a), str) and rx.match(entry[a]) for a, rx in _DIGEST_RE.items())):
        return "whose entry is not {\"size\": bytes, \"xxh3_128\": 32 hex digits} (or a format-1 \"sha256\")"
    if not _stays_inside(root, rel, plain_dirs):
        return "which resolves outside the checkpoint directory (a symbolic link)"
    return None


def _stays_inside(root: str, rel: str, plain_dirs: Set[str]) -> bool:
    """Whether ``root/rel`` (``rel`` normalised, not absolute, no ``..``) resolves inside ``root``
    (a real path): so it does when none of its components is a symbolic link (one ``lstat`` each,
    where ``os.path.realpath`` would look at every component from ``/`` again, per entry), else
    the link is resolved. A missing component stays inside (the size check names it)."""
    path = root
    parts = rel.split(os.sep)
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        if path in plain_dirs:
            continue
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return True
        if stat.S_ISLNK(mode):
            return os.path.realpath(os.path.join(root, rel)).startswith(root + os.sep)
        if i < len(parts) - 1:
            plain_dirs.add(path)
    return True


def check_sizes(ckpt: str, files: Dict[str, dict]) -> List[str]:
    """Cheap first pass: every listed file exists with its recorded size."""
    errors = []
    for rel, entry in sorted(files.items()):
        path = os.path.join(ckpt, rel)
        if not os.path.isfile(path):
            errors.append(f"{rel}: missing")
        elif os.path.getsize(path) != entry["size"]:
            errors.append(f"{rel}: size {os.path.getsize(path)} != {entry['size']} in the manifest (truncated or overwritten)")
    return errors


def check_hashes(ckpt: str, files: Dict[str, dict], rel_paths: Iterable[str]) -> List[str]:
    """Hash the given files (several at a time), each with the algorithm its manifest entry names
    (``xxh3_128``, or ``sha256`` in format-1 manifests); one message per mismatch."""
    rel_paths = list(rel_paths)
    check = lambda rel: checksum.check_file(os.path.join(ckpt, rel), files[rel])  # noqa: E731
    if sum(files[rel]["size"] for rel in rel_paths) < _INLINE_BYTES:
        found = [check(rel) for rel in rel_paths]  # starting threads would cost more than hashing
    else:
        found = parallel(check, rel_paths)
    return [f"{rel}: {problem}" for rel, problem in zip(rel_paths, found) if problem]


def verify(ckpt: str) -> List[str]:
    """All problems of one checkpoint directory, checked in this one process ([] = verified)."""
    try:
        files = read_manifest(ckpt)["files"]
    except ValueError as exc:
        return [str(exc)]
    return check_sizes(ckpt, files) or check_hashes(ckpt, files, sorted(files))


def write_manifest(staging: str, step: int, files: Dict[str, dict], durable: bool = True) -> None:
    """Write the manifest of ``staging`` (entries as ``describe_files`` gave them) and, unless
    ``durable=False``, make it and everything in ``staging`` durable (``make_durable``: files whose
    entry says ``SYNCED`` were fsynced by their writer and are not fsynced twice).

    ``durable=False`` is for a multi-rank save, where each rank then fsyncs its own files and rank
    0 the manifest and the directories (``make_durable``). The staging dir is never loaded: a crash
    before the commit leaves a staging dir, removed at the next start.
    """
    checksum.forget(staging)  # records of this save's files not described (e.g. a rank's retry)
    entries = {rel: {k: v for k, v in e.items() if k != checksum.SYNCED} for rel, e in files.items()}
    manifest = {"format": FORMAT, "step": step, "created_unix": time.time(), "files": entries}
    write_staged(os.path.join(staging, MANIFEST), json_bytes(manifest))
    checksum.forget(staging)
    if durable:
        make_durable(staging, [rel for rel, e in files.items() if not e.get(checksum.SYNCED)], tree=True)


def make_durable(staging: str, rel_paths: Iterable[str], tree: bool) -> None:
    """fsync the given files of ``staging`` and, with ``tree``, its manifest, its subdirectories
    and ``staging`` itself: all at once, on a thread each (up to ``_SYNC_THREADS``), so that the
    flushes overlap and the journal commits them together."""
    todo = [os.path.join(staging, rel) for rel in sorted(rel_paths)]
    if tree:
        todo.append(os.path.join(staging, MANIFEST))
        todo += [dirpath for dirpath, _dirs, _files in os.walk(staging, topdown=False)]  # staging itself last
    parallel(fsync_file, todo, _SYNC_THREADS)


# --- the checkpoints directory ------------------------------------------------------------------

def committed(ckpt_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of every ``step_XXXXXXXX`` directory, newest first (not yet verified)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(parse_step(n), os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir)]
    return sorted(((s, p) for s, p in found if s is not None and os.path.isdir(p)), reverse=True)


def read_latest(ckpt_dir: str) -> Optional[str]:
    """The checkpoint name ``latest`` holds, or None when it is missing, empty or holds anything
    but a ``step_XXXXXXXX`` name (it is not fsynced: after a crash it may hold garbage)."""
    try:
        with open(os.path.join(ckpt_dir, LATEST), "rb") as f:
            name = f.read(64).decode("ascii").strip()
    except (OSError, ValueError):
        return None
    return name if _STEP_RE.match(name) else None


def commit(staging: str, final: str) -> None:
    """Rename the complete staging dir to its final name and point ``latest`` at it.

    A directory already at ``final`` (a checkpoint of an abandoned timeline with the same step)
    is moved aside first and deleted after the new one is in place.
    """
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):
        old = os.path.join(parent, DELETING_PREFIX + os.path.basename(final) + f".{os.getpid()}")
        with NAMES:
            os.rename(final, old)
    os.rename(staging, final)
    # set_latest fsyncs ``parent`` after its own rename: that one fsync makes both renames durable.
    # (Should only the ``latest`` rename survive a crash, resume finds the newest directory itself.)
    set_latest(parent, os.path.basename(final))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def set_latest(ckpt_dir: str, name: str) -> None:
    """Point ``latest`` at ``name`` (atomically; durable with the fsync of ``ckpt_dir``). Resume
    falls back to the newest directory when ``latest`` is empty or names no checkpoint, so the
    file itself is not fsynced."""
    write_atomic(os.path.join(ckpt_dir, LATEST), name + "\n", sync_file=False)
