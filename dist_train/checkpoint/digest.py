"""Each checkpoint file's SHA-256, added to its manifest in the background after the commit.

dist_train verifies checkpoints with the manifest's XXH3-128 checksums, taken while the files are
written (``checksum.py``). The run directory's contract also promises every file's SHA-256, for
outside tools (``sha256sum``, a storage system's audit, a script that checks a checkpoint before
it is copied). Hashing every byte with SHA-256 during the save would put it on the save's
critical path (about 1.7 GB/s of one core here: a 5 MB save +3 ms, +30%), so they are taken
after the commit, on a thread of its own in every rank (``checkpoint.sha256``):

- each rank reads back the files it wrote (from the page cache, usually; never another rank's,
  which on a multi-node job would cross the network) and hashes them with both algorithms in one
  pass; a file whose bytes no longer match their XXH3-128 is reported and gets no SHA-256
  (outside tools must not be told that corrupt bytes are right); the other ranks leave their
  digests in side files, which rank 0 merges;
- the new manifest (the same one, each entry with a ``sha256`` beside its ``xxh3_128``) is
  written next to the old one, fsynced and renamed over it: a crash leaves the old manifest or
  the new one, both valid; the checkpoint is complete either way;
- renaming a committed checkpoint directory (a prune, a commit over the same step, setting a
  corrupt one aside) and replacing its manifest exclude each other (``layout.NAMES``), so a
  manifest is never written into a directory that has just been moved or deleted;
- the end of a job waits for the last digest (``wait``, after summary.json): a finished run's
  checkpoints all carry their SHA-256; a killed run's newest checkpoint may not (it is complete
  and verified without), and the run that resumes from it adds them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
from typing import Dict, Iterable, List, Optional, Tuple

from dist_train.checkpoint import checksum, layout

log = logging.getLogger("dist_train.checkpoint")

SHA256 = "sha256"
TMP_PREFIX = f".{layout.MANIFEST}.sha256."  # the new manifest before its rename (in the checkpoint dir)
SIDE_PREFIX = ".sha256.rank_"  # a rank's digests of the files it wrote, for rank 0 (in the checkpoint dir)
PEER_WAIT_S = 300.0  # how long rank 0 waits for the other ranks' digests of a checkpoint
_POLL_S = 0.05
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _hash_both(path: str) -> dict:
    """``{"size", "xxh3_128", "sha256"}`` of a file, read once."""
    return checksum.hash_file(path, checksum.ALGORITHM, SHA256)


def add_sha256(ckpt: str, mine: Optional[Iterable[str]] = None, rank: int = 0, world: int = 1,
               wait_s: float = PEER_WAIT_S) -> List[str]:
    """Give the entries of ``ckpt``'s manifest their files' SHA-256 (entries that have one keep it).

    Each rank hashes the files it wrote (``mine``; None: every listed file), so that no rank reads
    another's shards back (on a multi-node job, over the network). A rank other than 0 leaves its
    digests in a side file of the checkpoint dir (``.sha256.rank_R.json``); rank 0 waits for them
    (up to ``wait_s`` after its own; a rank that is gone leaves its files without), merges them and
    replaces the manifest. Returns the problems found (files that no longer match their checksum; a
    directory or manifest that changed meanwhile is no problem: nothing is written then)."""
    path = os.path.join(ckpt, layout.MANIFEST)
    problems: List[str] = []
    digests: Dict[str, List[str]] = {}  # rel -> [its XXH3-128 as read, its SHA-256]
    try:
        before = os.stat(path)
        manifest = layout.read_manifest(ckpt)
        files = manifest["files"]
        todo = [rel for rel in sorted(files if mine is None else mine) if rel in files and SHA256 not in files[rel]]
        for rel in todo:  # one file at a time, on this thread: the IO pool (``layout.parallel``) is the saves'
            got = _hash_both(os.path.join(ckpt, rel))
            problem = checksum.mismatch(got, files[rel])
            if problem:
                problems.append(f"{rel}: {problem}")
            else:
                digests[rel] = [got[checksum.ALGORITHM], got[SHA256]]
    except (OSError, ValueError):  # (moved, pruned or replaced since the commit; a file not readable)
        if rank != 0:
            _write_side(ckpt, rank, digests)  # (what it has, even nothing: rank 0 does not wait in vain)
        return problems
    if rank != 0:
        _write_side(ckpt, rank, digests)
        return problems
    missing, deadline = [], time.monotonic() + wait_s  # (one deadline for every peer)
    for peer in range(1, world):
        theirs = _read_side(ckpt, peer, deadline)
        if theirs is None:
            if not os.path.isdir(ckpt):
                return problems  # (pruned or set aside meanwhile)
            missing.append(peer)
            continue
        # A peer's digest counts only for the very bytes the manifest lists (a side file of another
        # checkpoint of the same step, renamed into this one, does not).
        digests.update({rel: pair for rel, pair in theirs.items()
                        if rel in files and isinstance(pair, list) and len(pair) == 2
                        and pair[0] == files[rel].get(checksum.ALGORITHM) and isinstance(pair[1], str)
                        and _SHA256_RE.match(pair[1])})
    if missing:
        log.warning("checkpoint %s: no SHA-256 checksums from rank(s) %s within %.0f s; their files are recorded "
                    "without", os.path.basename(ckpt), ", ".join(map(str, missing)), wait_s)
    for rel, (_fast, sha) in digests.items():
        files[rel][SHA256] = sha
    if digests:
        _replace_manifest(ckpt, manifest, before)
    with contextlib.suppress(OSError):  # every rank's side files (an earlier attempt's too)
        for name in os.listdir(ckpt):
            if name.startswith(SIDE_PREFIX):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(ckpt, name))
    return problems


def _side_path(ckpt: str, rank: int) -> str:
    return os.path.join(ckpt, f"{SIDE_PREFIX}{rank:05d}.json")


def _write_side(ckpt: str, rank: int, digests: Dict[str, List[str]]) -> None:
    """A rank's digests for rank 0, written whole (a temporary file renamed) or not at all."""
    side = _side_path(ckpt, rank)
    tmp = f"{side}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(digests, f)
        os.replace(tmp, side)
    except OSError as exc:  # (the directory pruned meanwhile; a full disk)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if os.path.isdir(ckpt):
            log.warning("rank %d could not leave its SHA-256 checksums in %s: %s", rank, ckpt, exc)


def _read_side(ckpt: str, rank: int, deadline: float) -> Optional[Dict[str, List[str]]]:
    """Rank ``rank``'s digests once its side file is there (None: not by ``deadline``, or the
    checkpoint dir is gone)."""
    side = _side_path(ckpt, rank)
    while True:
        try:
            with open(side, encoding="utf-8") as f:
                value = json.load(f)
            return value if isinstance(value, dict) else {}
        except FileNotFoundError:
            if time.monotonic() > deadline or not os.path.isdir(ckpt):
                return None
            time.sleep(_POLL_S)
        except (OSError, ValueError):
            return {}


def _replace_manifest(ckpt: str, manifest: dict, before: os.stat_result) -> None:
    """Write ``manifest`` over ``ckpt``'s, unless the directory was moved or the manifest replaced
    since ``before`` was taken (then nothing is written)."""
    path = os.path.join(ckpt, layout.MANIFEST)
    tmp = os.path.join(ckpt, f"{TMP_PREFIX}{os.getpid()}")
    with layout.NAMES:
        try:
            now = os.stat(path)
        except OSError:
            return
        if (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
            return  # (replaced meanwhile)
        for name in os.listdir(ckpt):  # (a killed process's temporary manifest)
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(ckpt, name))
        try:
            with open(tmp, "wb") as f:
                f.write(layout.json_bytes(manifest))
                f.flush()
                os.fsync(f.fileno())  # (never a manifest renamed into place before its bytes)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            log.warning("could not add SHA-256 checksums to %s: %s", path, exc)


_Job = Tuple[str, Optional[List[str]], int, int]  # (checkpoint dir, this rank's files, rank, world)


class Digester:
    """The thread that adds SHA-256 checksums to committed checkpoints, one at a time (every rank:
    each its own files; rank 0 merges)."""

    def __init__(self):
        self._jobs: "queue.SimpleQueue[_Job]" = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._queued = 0
        self._thread: Optional[threading.Thread] = None

    def submit(self, job: _Job) -> None:
        with self._idle:
            self._queued += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="checkpoint-sha256", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            ckpt, mine, rank, world = self._jobs.get()
            try:
                problems = add_sha256(ckpt, mine, rank, world)
                if problems:
                    log.error("checkpoint %s changed after its commit; no SHA-256 recorded for: %s",
                              os.path.basename(ckpt), "; ".join(problems))
            except Exception as exc:  # noqa: BLE001  (a digest is never worth a failed run)
                log.warning("could not add SHA-256 checksums to %s: %s", ckpt, exc)
            finally:
                with self._idle:
                    self._queued -= 1
                    self._idle.notify_all()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Until every submitted checkpoint has its SHA-256 checksums; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._queued == 0, timeout)


_digester = Digester()


def submit(ckpt: str, mine: Optional[Iterable[str]] = None, rank: int = 0, world: int = 1) -> None:
    """Add SHA-256 checksums to the manifest of the committed checkpoint ``ckpt``, in the background:
    of the files ``mine`` (those this rank wrote; None: all), merged by rank 0 (see ``add_sha256``)."""
    _digester.submit((ckpt, None if mine is None else list(mine), rank, world))


def wait(timeout: Optional[float] = None) -> bool:
    """Wait until every checkpoint submitted by this process has its SHA-256 checksums."""
    return _digester.wait(timeout)


def _forget() -> None:
    """(in a forked child: the parent's thread and queue are not there)"""
    global _digester
    _digester = Digester()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)
