"""The checkpoint manager: what a checkpoint holds, when it is saved, and how every rank takes part.

    manager = CheckpointManager(job.checkpoint, run_dir, strategy, ...)
    manager.resume(state)            # collective: newest verified checkpoint (or none), loaded
    ... each step: manager.maybe_save(state)   # cadence, preemption, async: its own business
    manager.finalize(state)          # the end-of-run checkpoint, and every save made durable

Every public method is called on every rank: the collectives inside never depend on the rank.
Checkpoint collectives run on their own gloo group, so an async save's background thread never
interleaves with the training collectives on the default group.

A save, on every rank: write its files into ``checkpoints/.staging_step_XXXXXXXX`` (its RNG
states; rank 0 also ``meta.json``; model and optimizer through DCP, or the engine's own files),
then all ranks agree that every write succeeded (an all-reduce of a flag: one failed rank aborts
the commit everywhere), hash their share of the files, and rank 0 commits (see ``layout.py``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from dist_train.checkpoint import faults, layout, portable, storage
from dist_train.checkpoint.preemption import PreemptionWatcher
from dist_train.checkpoint.restore import CheckpointError, CheckpointRefused, Restorer
from dist_train.env.seed import rng_state

log = logging.getLogger("dist_train.checkpoint")


class _Group:
    """The collectives the manager needs, on its own group (identity without a process group)."""

    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized()
        self.pg = dist.new_group(backend="gloo") if self.on else None
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier(group=self.pg)

    def all_ok(self, ok: bool) -> bool:
        if not self.on:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.pg)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        if not self.on:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out


class _Pending:
    """One save running in a background thread."""

    def __init__(self, step: int, fn: Callable[[], None]):
        self.step, self.error, self.seconds = step, None, 0.0
        self.thread = threading.Thread(target=self._run, args=(fn,), name=f"checkpoint-{step}", daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001  (raised on the main thread by wait())
            self.error = exc
            log.error("background checkpoint of step %d failed: %s", self.step, exc)
        self.seconds = time.perf_counter() - t0


class CheckpointManager:
    def __init__(self, cfg, run_dir: str, strategy, *, config: Dict[str, Any], micro_global_batch: int,
                 grad_accum_steps: int, seed: int, run_id: Callable[[], Optional[str]] = lambda: None):
        self.cfg = cfg
        self.dir = os.path.join(run_dir, layout.CHECKPOINTS)
        self.run_dir = run_dir
        self.strategy = strategy
        self.config = config
        self.micro_global_batch = micro_global_batch
        self.grad_accum_steps = grad_accum_steps
        self.run_id = run_id
        self.group = _Group()
        self.rank, self.world = self.group.rank, self.group.world
        self.rank0 = self.rank == 0
        self.native = bool(strategy.native_checkpoint)
        self.restorer = Restorer(self, seed)
        self.preemption = PreemptionWatcher(strategy.device)
        self.preempted = False
        self.last_step: Optional[int] = None  # step of the newest checkpoint saved or loaded
        self.resumed_run_id: Optional[str] = None
        self._pending: Optional[_Pending] = None
        self._stager = None
        # blocking_s: time the training thread spent in checkpoint code (waits for a previous save
        # included); steps_during_writes: optimizer steps trained while a save was being written.
        self.stats = {"saves": 0, "blocking_s": 0.0, "write_s": 0.0, "steps_during_writes": 0,
                      "async": bool(cfg.async_save) and not self.native}
        if cfg.async_save and self.native:
            log.warning("checkpoint.async_save: %s writes its own checkpoint synchronously; saving in the foreground",
                        strategy.name)

    # --- resume ----------------------------------------------------------------------------

    def resume(self, state) -> Optional[str]:
        """Collective: load the checkpoint ``checkpoint.resume`` selects into ``state`` and the
        strategy; tidy the checkpoints dir; trim logs past the resumed step. Returns its path."""
        path = self.restorer.resume(state)
        self.last_step = state.step if path else None
        # The run dir holds one timeline: records a killed or abandoned process wrote past the
        # resumed step (0 for a fresh start) are dropped before this process logs them again.
        if self.rank0:
            dropped = layout.trim_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), state.step)
            if dropped:
                log.info("metrics.jsonl: dropped %d record(s) past step %d (the resumed timeline logs them anew)",
                         dropped, state.step)
        layout.trim_jsonl(os.path.join(self.run_dir, f"sample_ids.rank{self.rank}.jsonl"), state.step)
        return path

    # --- saving ----------------------------------------------------------------------------

    def maybe_save(self, state) -> None:
        """After each optimizer step, on every rank: notice preemption, save when due."""
        faults.delay("step_sleep")
        if self._pending is not None and self._pending.thread.is_alive():
            self.stats["steps_during_writes"] += 1
        if self.preemption.requested():
            self.preempted = True  # the loop stops; finalize() saves at this very step
            return
        if self.cfg.every_steps and state.step % self.cfg.every_steps == 0:
            self.save(state)

    def stop_requested(self) -> bool:
        return self.preempted

    def finalize(self, state) -> None:
        """The end-of-run checkpoint (unless this step is saved already); waits until every save
        is committed. Called on every rank after the loop, also after preemption."""
        if self.last_step != state.step:
            self.save(state, blocking=True)
        self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise if it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        t0 = time.perf_counter()
        pending.thread.join()
        self.stats["blocking_s"] += time.perf_counter() - t0
        self.stats["write_s"] += pending.seconds
        if pending.error is not None:
            raise CheckpointError(f"checkpoint of step {pending.step} failed: {pending.error}") from pending.error

    def save(self, state, blocking: bool = False) -> None:
        """Collective: checkpoint ``state`` and the strategy at this step.

        Synchronous unless ``checkpoint.async_save``: then this rank's state is copied to host
        memory here and the files are written and committed by a background thread while training
        goes on (at most one save in flight: a new save first waits for the previous one).
        """
        self.wait()  # (its time is counted in blocking_s by wait itself)
        t0 = time.perf_counter()
        step = state.step
        staging = os.path.join(self.dir, layout.staging_name(step))
        snapshot, error = None, None
        if self.rank0:
            try:
                layout.remove_stale(self.dir)
                os.makedirs(os.path.join(staging, layout.RNG_DIR))
            except OSError as exc:  # the other ranks then fail to write too: all abort below
                error = exc
        self.group.barrier()  # nobody writes into the staging dir before it exists, clean
        try:
            _torch_save(rng_state(), os.path.join(staging, layout.rng_file(self.rank)))
            if self.rank0:
                layout.write_json_atomic(os.path.join(staging, layout.META), self._meta(state))
            if not self.native:
                snapshot = self.strategy.state_dict()
                if self.stats["async"] and not blocking:
                    snapshot = self._stage(snapshot)
        except Exception as exc:  # noqa: BLE001  (every rank must reach the agreement below)
            error = exc
            log.error("rank %d could not prepare checkpoint step %d: %s", self.rank, step, exc)
        if not self.group.all_ok(error is None):
            self._abort(staging)
            raise CheckpointError(f"checkpoint of step {step} aborted: a rank failed to write its part"
                                  + (f" (here: {error})" if error else ""))
        write = lambda: self._write_and_commit(step, staging, snapshot)  # noqa: E731
        self.last_step = step
        self.stats["saves"] += 1
        if self.stats["async"] and not blocking:
            self._pending = _Pending(step, write)
            self.stats["blocking_s"] += time.perf_counter() - t0
            return
        t1 = time.perf_counter()
        write()
        self.stats["write_s"] += time.perf_counter() - t1
        self.stats["blocking_s"] += time.perf_counter() - t0

    def _stage(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        """A host-memory copy of ``state_dict`` (DTensors stay DTensors), so training may change
        the originals while the copy is written. The buffers are reused by the next save."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._stager is None:
            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=False))
        return self._stager.stage(state_dict)

    def _write_and_commit(self, step: int, staging: str, snapshot: Optional[Dict[str, Any]]) -> None:
        error: Optional[BaseException] = None
        try:
            faults.delay("slow_write")
            dcp_dir = os.path.join(staging, layout.DCP_DIR)
            if self.native:
                self.strategy.save_native(os.path.join(staging, layout.NATIVE_DIR))
                snapshot = {"model": portable.engine_full_weights(self.strategy)}
            storage.save(snapshot, dcp_dir, self.group.pg)
        except Exception as exc:  # noqa: BLE001
            error = exc
            log.error("rank %d could not write checkpoint step %d: %s", self.rank, step, exc)
        faults.crash_point("after_shards", step)
        if not self.group.all_ok(error is None):
            self._abort(staging)
            raise CheckpointError(f"checkpoint of step {step} aborted: a rank failed to write its shards"
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
            self._abort(staging)
            raise CheckpointError(f"checkpoint of step {step} aborted: its staging dir cannot be listed")
        try:
            mine: Optional[Dict[str, dict]] = layout.describe_files(staging, files[self.rank::self.world])
        except OSError as exc:
            log.error("rank %d could not hash checkpoint files: %s", self.rank, exc)
            mine = None
        shares = self.group.all_gather(mine)
        outcome: Any = None
        if self.rank0:
            try:
                if any(share is None for share in shares):
                    raise OSError("a rank could not read back its files")
                entries = {k: v for share in shares for k, v in share.items()}
                layout.write_manifest(staging, step, entries)
                layout.commit(staging, os.path.join(self.dir, layout.step_name(step)))
                pruned = layout.prune(self.dir, self.cfg.keep_last, keep=step)
                size = sum(e["size"] for e in entries.values())
                outcome = ("ok", f"{len(entries)} files, {size / 2**20:.1f} MiB" +
                           (f"; pruned {', '.join(pruned)}" if pruned else ""))
            except Exception as exc:  # noqa: BLE001
                outcome = ("error", f"{type(exc).__name__}: {exc}")
                self._abort(staging)
        outcome = self.group.broadcast(outcome)
        if outcome[0] != "ok":
            raise CheckpointError(f"checkpoint of step {step} not committed: {outcome[1]}")
        if self.rank0:
            log.info("checkpoint %s committed (%s)", layout.step_name(step), outcome[1])

    def _abort(self, staging: str) -> None:
        if self.rank0:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)

    def _meta(self, state) -> Dict[str, Any]:
        scaler = self.strategy.precision.scaler
        return {
            "format": layout.FORMAT,
            "kind": "native" if self.native else "dcp",
            "step": state.step,
            "train_state": {k: v for k, v in state.state_dict().items() if k != "resumed_from_step"},
            "strategy": self.strategy.name,
            "world_size": self.world,
            "micro_global_batch": self.micro_global_batch,
            "grad_accum_steps": self.grad_accum_steps,
            "scheduler": self.strategy.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None and not self.native else None,
            "mlflow_run_id": self.run_id(),
            "config": self.config,
            "torch_version": torch.__version__,
            "created_unix": time.time(),
        }

    def close(self) -> None:
        """Restore signal handlers. A save still in flight here means the run failed: it is not
        waited for (peers may be gone); its staging dir is removed at the next start."""
        self.preemption.close()
        if self._stager is not None:
            self._stager.close()
            self._stager = None


def _torch_save(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


__all__ = ["CheckpointError", "CheckpointManager", "CheckpointRefused"]
