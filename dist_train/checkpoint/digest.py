"""Each checkpoint file's SHA-256, added to its manifest in the background after the commit.

dist_train verifies checkpoints with the manifest's XXH3-128 checksums, taken while the files are
written (``checksum.py``). The run directory's contract also promises every file's SHA-256, for
outside tools (``sha256sum``, a storage system's audit, a script that checks a checkpoint before
it is copied). Hashing every byte with SHA-256 during the save would put it on the save's
critical path (about 1.7 GB/s of one core here: a 5 MB save +3 ms, +30%), so rank 0 takes them
after the commit, on a thread of its own (``checkpoint.sha256``):

- each listed file is read back (from the page cache, usually) and hashed with both algorithms in
  one pass; a file whose bytes no longer match their XXH3-128 is reported and gets no SHA-256
  (outside tools must not be told that corrupt bytes are right);
- the new manifest (the same one, each entry with a ``sha256`` beside its ``xxh3_128``) is
  written next to the old one, fsynced and renamed over it: a crash leaves the old manifest or
  the new one, both valid; the checkpoint is complete either way;
- renaming a committed checkpoint directory (a prune, a commit over the same step, setting a
  corrupt one aside) and replacing its manifest exclude each other (``layout.NAMES``), so a
  manifest is never written into a directory that has just been moved or deleted;
- the end of a run waits for the last digest (``wait``): a finished run's checkpoints all carry
  their SHA-256; a killed run's newest checkpoint may not (it is complete and verified without).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import List, Optional

from dist_train.checkpoint import checksum, layout

log = logging.getLogger("dist_train.checkpoint")

SHA256 = "sha256"
TMP_PREFIX = f".{layout.MANIFEST}.sha256."  # the new manifest before its rename (in the checkpoint dir)


def _hash_both(path: str) -> dict:
    """``{"size", "xxh3_128", "sha256"}`` of a file, read once."""
    return checksum.hash_file(path, checksum.ALGORITHM, SHA256)


def add_sha256(ckpt: str) -> List[str]:
    """Give every entry of ``ckpt``'s manifest its file's SHA-256 (entries that have one keep it).
    Returns the problems found (files that no longer match their checksum; a directory or
    manifest that changed meanwhile is no problem: nothing is written then)."""
    path = os.path.join(ckpt, layout.MANIFEST)
    try:
        before = os.stat(path)
        manifest = layout.read_manifest(ckpt)
    except (OSError, ValueError):
        return []  # (moved, pruned or replaced since the commit: nothing to add to)
    files = manifest["files"]
    todo = [rel for rel, entry in sorted(files.items()) if SHA256 not in entry]
    if not todo:
        return []
    try:
        # One file at a time, on this thread: the IO pool (``layout.parallel``) is the saves'.
        found = [_hash_both(os.path.join(ckpt, rel)) for rel in todo]
    except OSError:
        return []  # (a file gone: the directory was pruned or set aside meanwhile)
    problems = []
    for rel, got in zip(todo, found):
        problem = checksum.mismatch(got, files[rel])
        if problem:
            problems.append(f"{rel}: {problem}")
        else:
            files[rel][SHA256] = got[SHA256]
    data = layout.json_bytes(manifest)
    tmp = os.path.join(ckpt, f"{TMP_PREFIX}{os.getpid()}")
    with layout.NAMES:
        try:
            now = os.stat(path)
        except OSError:
            return problems
        if (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
            return problems  # (replaced meanwhile)
        for name in os.listdir(ckpt):  # (a killed process's temporary manifest)
            if name.startswith(TMP_PREFIX):
                try:
                    os.remove(os.path.join(ckpt, name))
                except OSError:
                    pass
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # (never a manifest renamed into place before its bytes)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.remove(tmp)
            except OSError:
                pass
            log.warning("could not add SHA-256 checksums to %s: %s", path, exc)
    return problems


class Digester:
    """The thread that adds SHA-256 checksums to committed checkpoints, one at a time (rank 0)."""

    def __init__(self):
        self._jobs: "queue.SimpleQueue[Optional[str]]" = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._queued = 0
        self._thread: Optional[threading.Thread] = None

    def submit(self, ckpt: str) -> None:
        with self._idle:
            self._queued += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="checkpoint-sha256", daemon=True)
                self._thread.start()
        self._jobs.put(ckpt)

    def _loop(self) -> None:
        while True:
            ckpt = self._jobs.get()
            try:
                problems = add_sha256(ckpt)
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


def submit(ckpt: str) -> None:
    """Add SHA-256 checksums to the manifest of the committed checkpoint ``ckpt``, in the background."""
    _digester.submit(ckpt)


def wait(timeout: Optional[float] = None) -> bool:
    """Wait until every checkpoint submitted by this process has its SHA-256 checksums."""
    return _digester.wait(timeout)


def _forget() -> None:
    """(in a forked child: the parent's thread and queue are not there)"""
    global _digester
    _digester = Digester()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)
