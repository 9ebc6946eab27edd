"""Which checkpoints a run keeps, and the clean-up of what a crash or a prune leaves behind.

``keep_last`` checkpoints stay (the one just committed always among them); older ones are renamed
to a hidden ``.deleting_*`` name at once (a crash mid-delete never leaves a half-deleted directory
that looks like a checkpoint) and their files are removed by a background thread. Staging dirs,
``.deleting_*`` dirs and temporary ``latest`` files of a crashed process are removed at the next
save or start; a checkpoint that cannot be loaded (or, at a resume, one newer than the step resumed)
is moved into ``set_aside/`` under another name, never deleted.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from typing import Dict, List, Optional

from dist_train.checkpoint import layout


def to_prune(steps: List[int], keep_last: int, keep: int, protect: Optional[int] = None) -> List[int]:
    """Steps to delete so that the ``keep_last`` newest remain; ``keep`` (the checkpoint just
    committed: the newest verified one) is never among them, nor ``protect`` (the best
    evaluation's, ``checkpoint.best_metric``: kept besides the newest). ``keep_last=0`` keeps
    everything."""
    if keep_last <= 0:
        return []
    newest_first = sorted(set(steps), reverse=True)
    kept = [keep] + [s for s in newest_first if s != keep][: max(keep_last - 1, 0)] + [protect]
    return sorted(s for s in newest_first if s not in kept)


def prune(ckpt_dir: str, keep_last: int, keep: int, protect: Optional[int] = None) -> List[str]:
    """Delete old checkpoints: each is renamed to a hidden name here (so a crash mid-delete never
    leaves a half-deleted directory that looks like a checkpoint) and its files are removed by a
    background thread (unlinking gigabytes takes a while). Returns the deleted names.

    The renames are not fsynced: should a crash undo one, a complete older checkpoint reappears,
    which the next prune removes again.
    """
    by_step = {s: p for s, p in layout.committed(ckpt_dir)}
    deleted, doomed = [], []
    for step in to_prune(list(by_step), keep_last, keep, protect):
        doomed.append(os.path.join(ckpt_dir, layout.DELETING_PREFIX + layout.step_name(step)))
        with layout.NAMES:  # (not while its manifest is being replaced: digest.py)
            os.rename(by_step[step], doomed[-1])
        deleted.append(layout.step_name(step))
    _delete_later(doomed)
    return deleted


_deleting_lock = threading.Lock()
_deleting: Dict[str, threading.Thread] = {}  # path being removed in the background -> its thread


def _delete_later(paths: List[str]) -> None:
    """Remove ``paths`` in a background thread; a save never waits for it. The thread is not a
    daemon: the interpreter finishes the deletion before it exits; a killed process leaves
    ``.deleting_*`` dirs, which ``remove_stale`` removes at the next save or start."""
    if not paths:
        return

    def run() -> None:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
            with _deleting_lock:
                _deleting.pop(path, None)

    thread = threading.Thread(target=run, name="checkpoint-delete")
    with _deleting_lock:
        for path in paths:
            _deleting[path] = thread
    thread.start()


def wait_deleted() -> None:
    """Wait until every background deletion this process started has finished (for a benchmark
    that must not time it alongside something else)."""
    with _deleting_lock:
        threads = set(_deleting.values())
    for thread in threads:
        thread.join()


def remove_stale(ckpt_dir: str) -> List[str]:
    """Remove staging and half-deleted directories and temporary files left by a crash (those
    this process is deleting in the background are its deleter's business)."""
    if not os.path.isdir(ckpt_dir):
        return []
    removed = []
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        with _deleting_lock:
            if path in _deleting:
                continue
        try:
            if name.startswith((layout.STAGING_PREFIX, layout.DELETING_PREFIX)):
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
                removed.append(name)
            elif name.startswith(layout.LATEST + ".tmp"):
                os.remove(path)
        except FileNotFoundError:
            pass
    return removed


SET_ASIDE_DIR = "set_aside"  # under checkpoints/: the checkpoints a resume moved out of the way


def set_aside(path: str, suffix: str) -> str:
    """Move a checkpoint dir out of the ``step_XXXXXXXX`` namespace, into ``set_aside/`` next to it
    as ``step_XXXXXXXX.<suffix>`` (kept for inspection, never loaded, never pruned; a ``step_*``
    glob of the checkpoints dir finds only checkpoints); returns its path relative to that dir."""
    aside = os.path.join(os.path.dirname(os.path.abspath(path)), SET_ASIDE_DIR)
    os.makedirs(aside, exist_ok=True)
    name = f"{os.path.basename(os.path.normpath(path))}.{suffix}"
    if os.path.exists(os.path.join(aside, name)):
        name = f"{name}.{int(time.time())}"
    with layout.NAMES:
        os.rename(path, os.path.join(aside, name))
    return os.path.join(SET_ASIDE_DIR, name)
