"""The save protocol every rank follows, from its prepared part to a committed checkpoint.

On every rank (the writer thread of an async save, or inline): rank 0 makes a clean staging dir;
all agree it exists (the first agreement); each writes its part (the strategy's files, its RNG
states; rank 0 also ``meta.json``); all agree every write succeeded (one failed rank aborts the
save everywhere); each describes the files it wrote (checksums taken while writing, so nothing
is read back) and rank 0 gathers them into the manifest; each fsyncs what it wrote, rank 0 also
the manifest and the directories, all at once; once all agree they are durable, rank 0 renames
the staging dir into place, points ``latest`` at it and prunes (``layout.commit``,
``retention.prune``), and tells every rank the outcome. A failure anywhere raises the same
``CheckpointError`` on every rank and leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional

import torch

from dist_train.checkpoint import checksum, digest, layout, retention
from dist_train.checkpoint.restore import CheckpointError
from dist_train.env import collectives
from dist_train.env.faults import Faults

log = logging.getLogger("dist_train.checkpoint")


class SaveDropped(RuntimeError):
    """Raised by an async save's write when the ranks agreed not to commit it (see
    ``CheckpointManager._wait_staged``): every rank aborts the save without calling it a failure."""


class CheckpointGroup:
    """The collectives a checkpoint needs, on its own gloo group (identity without a process group)."""

    def __init__(self):
        self.pg = collectives.new_gloo_group()
        self.rank = collectives.rank()
        self.world = collectives.world_size()

    def barrier(self) -> None:
        collectives.barrier(self.pg)

    def all_ok(self, ok: bool) -> bool:
        return collectives.all_true(ok, self.pg)

    def broadcast(self, obj: Any) -> Any:
        return collectives.broadcast_object(obj, group=self.pg)

    def all_gather(self, obj: Any) -> List[Any]:
        return collectives.all_gather_object(obj, self.pg)


class Committer:
    """Runs the protocol for the saves of one checkpoints dir (``run``, on every rank alike)."""

    def __init__(self, ckpt_dir: str, group: CheckpointGroup, faults: Faults, keep_last: int, sha256: bool = True):
        self.dir, self.group, self.faults, self.keep_last = ckpt_dir, group, faults, keep_last
        self.sha256 = sha256  # rank 0 adds SHA-256 checksums to each committed manifest (digest.py)
        self.protect: Callable[[], Optional[int]] = lambda: None  # a step retention keeps whatever keep_last (best.py)
        self.rank, self.world = group.rank, group.world
        self.rank0 = self.rank == 0

    def run(self, step: int, staging: str, write: Optional[Callable[[], None]], rng: Any,
            meta: Optional[str], error: Optional[BaseException]) -> None:
        """Collective, on the writer thread of every rank (or inline for a synchronous save). A
        rank that failed to prepare (``error``) still takes part, so that all ranks abort alike."""
        if self.rank0 and error is None:
            try:
                retention.remove_stale(self.dir)
                os.makedirs(os.path.join(staging, layout.RNG_DIR))
            except OSError as exc:
                error = exc
        # Also the barrier: nobody writes into the staging dir before it exists, clean.
        if not self.group.all_ok(error is None):
            self.abort(staging)
            raise CheckpointError(f"checkpoint of step {step} in {self.dir} aborted: a rank failed to prepare its part"
                                  + (f" (here: {error})" if error else ""))
        try:
            self.faults.delay("slow_write")
            write()  # collective (DCP): every rank takes part, whatever else fails here
        except Exception as exc:  # noqa: BLE001
            error = exc
        try:
            layout.write_staged(os.path.join(staging, layout.rng_file(self.rank)), _torch_bytes(rng))
            if meta is not None:  # taken as compact JSON (fast), written indented
                layout.write_staged(os.path.join(staging, layout.META), layout.json_bytes(json.loads(meta)))
        except Exception as exc:  # noqa: BLE001
            error = error or exc
        if isinstance(error, SaveDropped):
            pass  # (the manager has said why, on the training thread)
        elif error is not None:
            log.error("rank %d could not write checkpoint step %d: %s", self.rank, step, error)
        self.faults.crash_point("after_shards", step)
        if not self.group.all_ok(error is None):
            self.abort(staging)
            raise CheckpointError(f"checkpoint of step {step} in {self.dir} aborted: a rank failed to write its shards"
                                  + (f" (here: {error})" if error else ""))
        # Every rank hashes its share of the files; rank 0 writes the manifest and commits.
        files = None
        if self.rank0:
            try:
                files = layout.list_files(staging)
            except OSError as exc:
                log.error("cannot list %s: %s", staging, exc)
        files = self.group.broadcast(files)
        if files is None:
            self.abort(staging)
            raise CheckpointError(f"checkpoint of step {step} aborted: its staging dir cannot be listed")
        try:
            mine: Optional[Dict[str, dict]] = layout.describe_files(
                staging, [f for i, f in enumerate(files) if _writer_of(f, i, self.world) == self.rank])
        except OSError as exc:
            log.error("rank %d could not hash checkpoint files: %s", self.rank, exc)
            mine = None
        shares = self.group.all_gather(mine)
        entries: Dict[str, dict] = {}
        error = None
        try:
            if any(share is None for share in shares):
                raise OSError("a rank could not read back its files")
            entries = {k: v for share in shares for k, v in share.items()}
            if self.rank0:
                layout.write_manifest(staging, step, entries, durable=False)
            # One barrier for every file and directory: each rank fsyncs what it wrote.
            layout.make_durable(staging, [rel for rel, e in (mine or {}).items() if not e.get(checksum.SYNCED)],
                                tree=self.rank0)
        except Exception as exc:  # noqa: BLE001  (every rank must reach the agreement below)
            error = exc
            log.error("rank %d could not make checkpoint step %d durable: %s", self.rank, step, exc)
        if not self.group.all_ok(error is None):
            self.abort(staging)
            raise CheckpointError(f"checkpoint of step {step} in {self.dir} not committed: a rank failed to write or "
                                  "flush its files" + (f" (here: {type(error).__name__}: {error})" if error else ""))
        outcome: Any = None
        if self.rank0:
            try:
                layout.commit(staging, os.path.join(self.dir, layout.step_name(step)))
                pruned = retention.prune(self.dir, self.keep_last, keep=step, protect=self.protect())
                size = sum(e["size"] for e in entries.values())
                outcome = ("ok", f"{len(entries)} files, {size / 2**20:.1f} MiB" +
                           (f"; pruned {', '.join(pruned)}" if pruned else ""))
            except Exception as exc:  # noqa: BLE001
                outcome = ("error", f"{type(exc).__name__}: {exc}")
                self.abort(staging)
        outcome = self.group.broadcast(outcome)
        if outcome[0] != "ok":
            raise CheckpointError(f"checkpoint of step {step} in {self.dir} not committed: {outcome[1]}")
        if self.sha256:  # each rank the files it wrote, in the background; rank 0 merges (digest.py)
            digest.submit(os.path.join(self.dir, layout.step_name(step)), sorted(mine or {}), self.rank, self.world)
        if self.rank0:
            log.info("checkpoint %s committed (%s)", layout.step_name(step), outcome[1])
        self.faults.crash_point("after_commit", step, self.rank)

    def abort(self, staging: str) -> None:
        """Remove an uncommitted staging dir (rank 0 made it); the previous checkpoint is untouched."""
        if self.rank0:
            shutil.rmtree(staging, ignore_errors=True)


_RANK_FILE = re.compile(r"^(?:rng/rank_(\d+)\.pt|dcp/__(\d+)_\d+\.distcp)$")
_RANK0_FILES = {layout.META, os.path.join(layout.DCP_DIR, ".metadata")}


def _writer_of(rel: str, index: int, world: int) -> int:
    """The rank that wrote ``rel``, whose checksums were taken during the write (so describing it
    costs no read) and which fsyncs it; files of no known rank are shared out round-robin."""
    if rel in _RANK0_FILES:
        return 0
    m = _RANK_FILE.match(rel)
    if m:
        rank = int(m.group(1) or m.group(2))
        if rank < world:
            return rank
    return index % world


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
