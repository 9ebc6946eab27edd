"""The checkpoint manager: what a checkpoint holds, when it is saved, and how every rank takes part.

    manager = CheckpointManager(job.checkpoint, run_dir, strategy, ...)
    manager.resume(state)            # collective: newest verified checkpoint (or none), loaded
    ... each step: manager.maybe_save(state)   # cadence and async writes: its own business
    manager.finalize(state)          # the end-of-run checkpoint, and every save made durable

The manager never asks which strategy it saves: the strategy hands it its small state (for
meta.json) and a function that writes the rest into a ``CheckpointFiles`` (``files.py``).

Every public method is called on every rank: the collectives inside never depend on the rank.
Checkpoint collectives run on their own gloo group, so an async save's background thread never
interleaves with the training collectives on the default group. The one collective of an async
save on the training thread (the ranks' verdict on its deferred copy, ``_wait_staged``) runs on a
third gloo group, at the next optimizer step, ``settle`` or ``wait``, alike on every rank.

A save, on every rank: take what must be taken at this step (RNG states, meta.json's contents, the
strategy's state, copied to host memory when written in the background), then hand the writing to
the commit protocol (``commit.py``): inline, or on the manager's writer thread for an async save.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Optional

import torch

from dist_train.checkpoint import layout
from dist_train.checkpoint.best import BestCheckpoint
from dist_train.checkpoint.commit import CheckpointGroup, Committer, SaveDropped
from dist_train.checkpoint.files import CheckpointFiles, Stager
from dist_train.checkpoint.restore import CheckpointError, CheckpointRefused, Restorer
from dist_train.env import collectives
from dist_train.env.faults import NO_FAULTS, Faults
from dist_train.env.seed import rng_state

log = logging.getLogger("dist_train.checkpoint")


class _Pending:
    """One save handed to the background writer: ``staged`` once its copy of the state is
    complete (``fn`` sets it); ``checked`` once the training thread has seen whether anything
    changed what was copied (then ``dropped`` says why the save must not be committed); ``done``
    once committed, failed or dropped."""

    def __init__(self, step: int):
        self.step, self.error, self.seconds = step, None, 0.0
        self.fn: Optional[Callable[[], None]] = None
        self.staged, self.checked, self.done = threading.Event(), threading.Event(), threading.Event()
        self.dropped: Optional[str] = None

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001  (raised on the main thread by wait())
            self.error = exc
            if self.dropped is None:
                log.error("background checkpoint of step %d failed: %s", self.step, exc)
        finally:
            self.seconds = time.perf_counter() - t0
            self.fn = None  # (the staged state it holds)
            self.staged.set()  # (already, unless fn failed before it got there)
            self.done.set()


class _Writer:
    """The background thread that writes asynchronous saves, one at a time. It lives as long as
    the manager: handing it a save is a queue put, where starting a thread per save made training
    wait for the new thread's start-up handshake (0.3 to 8 ms here, GIL hand-overs included)."""

    def __init__(self):
        self._jobs: "queue.SimpleQueue[Optional[_Pending]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.run()

    def submit(self, job: _Pending) -> _Pending:
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        """Let the thread end after the job in hand (not waited for: see ``CheckpointManager.close``)."""
        self._jobs.put(None)


class CheckpointManager:
    def __init__(self, cfg, run_dir: str, strategy, *, config: Dict[str, Any], micro_global_batch: int,
                 grad_accum_steps: int, seed: int, train_samples: Optional[int] = None, run_id: Callable[[], Optional[str]] = lambda: None,
                 faults: Faults = NO_FAULTS):
        # The strategies' checkpoint code imports DCP's state_dict module when first used: now, not
        # in the first save (4 ms of training held up); not at import (preflight never needs it).
        importlib.import_module("dist_train.strategy.dcp_state")

        self.cfg = cfg
        self.dir = os.path.join(run_dir, layout.CHECKPOINTS)
        self.run_dir = run_dir
        self.strategy = strategy
        self.config = config
        self.micro_global_batch = micro_global_batch
        self.train_samples = train_samples  # the training set's length (an epoch's order is a permutation of it)
        self.grad_accum_steps = grad_accum_steps
        self.run_id = run_id
        self.faults = faults
        self.group = CheckpointGroup()
        self.rank, self.world = self.group.rank, self.group.world
        self.rank0 = self.rank == 0
        self.restorer = Restorer(self, seed)
        self._committer = Committer(self.dir, self.group, faults, cfg.keep_last, cfg.sha256)
        self.best = (BestCheckpoint(cfg.best_metric, cfg.best_mode, self.dir, self.rank0)
                     if getattr(cfg, "best_metric", "") else None)  # checkpoint.best_metric
        self._own_steps: set = set()  # steps whose checkpoints in this run dir are this run's (committed, resumed)
        self.last_step: Optional[int] = None  # step of the newest checkpoint saved or loaded
        self.resumed_run_id: Optional[str] = None
        self._pending: Optional[_Pending] = None
        self._writer: Optional[_Writer] = None  # started at the first background save
        self._stager = Stager()
        # blocking_s: time training was held up by checkpoint code (waits for a previous save
        # included); final_s: the end-of-run save and the wait until every write is committed;
        # steps_during_writes: optimizer steps trained while a save was being written.
        self.stats = {"saves": 0, "blocking_s": 0.0, "final_s": 0.0, "write_s": 0.0, "steps_during_writes": 0,
                      "async": bool(cfg.async_save) and strategy.async_checkpoint}
        # The ranks' verdict on an async save's deferred copy is taken on the training thread: on
        # a group of its own (host-side gloo: no GPU sync, never interleaved with the writer's).
        self._verdict_pg = collectives.new_gloo_group() if self.stats["async"] else None
        if self.stats["async"]:
            strategy.before_update = self._wait_staged
        if cfg.async_save and not strategy.async_checkpoint:
            log.warning("checkpoint.async_save: %s writes its own checkpoint synchronously; saving in the foreground",
                        strategy.name)

    # --- resume ----------------------------------------------------------------------------

    def resume(self, state) -> Optional[str]:
        """Collective: load the checkpoint ``checkpoint.resume`` selects into ``state`` and the
        strategy, and tidy the checkpoints dir. Returns its path (None: a fresh start)."""
        path = self.restorer.resume(state)
        self.last_step = state.step if path else None
        own = path is not None and os.path.realpath(os.path.dirname(os.path.normpath(path))) == os.path.realpath(self.dir)
        if own:
            self._own_steps.add(state.step)  # (a checkpoint of this run dir: finalize may mark it the best)
        if self.best is not None:  # (the bar of a checkpoint of this run dir; a fresh start forgets an older one)
            self.best.restore(state.step if own else None, self.group.broadcast)
            self._committer.protect = lambda: self.best.protected
        return path

    def consider_best(self, step: int, results: Optional[Dict[str, Any]]) -> bool:
        """``checkpoint.best_metric``: whether the evaluation ``results`` of ``step`` (None: not
        evaluated there) is the best so far: then this step is saved (``maybe_save(best=True)``, or
        ``finalize``) and, once committed, ``best.json`` names it."""
        return self.best is not None and self.best.improved(step, results)

    def _committed(self, step: Optional[int], ok: bool = True, token: Any = None) -> None:
        """The save of ``step`` is committed in this run dir (``ok``), or failed or was dropped (it
        started with ``token`` pending: ``BestCheckpoint.failed``): on the thread that committed
        it (the writer thread of an async save), on every rank."""
        if ok:
            self._own_steps.add(step)
        if self.best is not None:
            if ok:
                self.best.committed(step)
            else:
                self.best.failed(step, token)

    # --- saving ----------------------------------------------------------------------------

    def due(self, step: int, epoch: Optional[int] = None) -> bool:
        """Whether ``maybe_save`` saves at ``step`` (``checkpoint.every_steps``; ``epoch``: the
        epochs completed when this step ended one, for ``checkpoint.every_epochs``)."""
        if epoch is not None and self.cfg.every_epochs and epoch % self.cfg.every_epochs == 0:
            return True
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def maybe_save(self, state, epoch: Optional[int] = None, best: bool = False) -> None:
        """After each optimizer step, on every rank: save when ``checkpoint.every_steps`` is due.
        A save that fails (a full disk, a read-only directory) has left the previous checkpoint as
        it was and removed its own staging files; ``checkpoint.on_save_error`` decides whether the
        run stops (raise) or warns and tries again at the next cadence (continue)."""
        if self._pending is not None and not self._pending.done.is_set():
            self.stats["steps_during_writes"] += 1
        if self.due(state.step, epoch) or best:  # (best: this step's evaluation is the best so far)
            try:
                self.wait()  # a background save that failed is reported here, before this one starts
            except CheckpointError as exc:
                self._save_failed(exc, "this step's save goes ahead")
            try:
                self.save(state)
            except CheckpointError as exc:
                self._save_failed(exc, "the next save is at the next step due")

    def _save_failed(self, exc: CheckpointError, then: str) -> None:
        """``checkpoint.on_save_error``: raise ``exc``, or count it, warn and go on (continue)."""
        if self.cfg.on_save_error != "continue":
            raise exc
        self.stats["failed_saves"] = self.stats.get("failed_saves", 0) + 1
        self.last_step = None  # so the end of the run saves again
        if self.rank0:
            log.warning("%s; training goes on (checkpoint.on_save_error=continue), %s", exc, then)

    def rollback(self, state) -> None:
        """Collective: back to the newest verified checkpoint (``train.nonfinite=rollback``),
        keeping the data position; checkpoints newer than it stay where they are."""
        self.wait()
        self.last_step = self.restorer.rollback(state)

    def finalize(self, state) -> None:
        """The end-of-run checkpoint (unless this step is saved already); waits until every save
        is committed. Called on every rank after the loop, also after preemption (then at the very
        step the loop stopped)."""
        blocked = self.stats["blocking_s"]
        try:
            try:
                self.wait()  # (a background save that failed, perhaps of this very step: saved again)
            except CheckpointError as exc:
                self._save_failed(exc, "saving again at the end of the run")
            if self.last_step != state.step:
                self.save(state, blocking=True)
            self.wait()
            if self.last_step == state.step and state.step in self._own_steps:
                self._committed(state.step)  # (saved, in this run dir, before the final evaluation found it the best)
        finally:
            # Training is over: this time is the end of the run's, not time training was held up.
            self.stats["final_s"] = self.stats.get("final_s", 0.0) + self.stats["blocking_s"] - blocked
            self.stats["blocking_s"] = blocked

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise if it failed. Collective
        while that save's copy is unchecked (see ``_wait_staged``)."""
        pending = self._pending
        if pending is None:
            return
        self._wait_staged()
        self._pending = None
        t0 = time.perf_counter()
        pending.done.wait()
        self.stats["blocking_s"] += time.perf_counter() - t0
        self.stats["write_s"] += pending.seconds
        if pending.dropped is not None:
            self.stats["dropped_saves"] = self.stats.get("dropped_saves", 0) + 1
            if self.last_step == pending.step:
                self.last_step = None  # so the end of the run saves again
            return
        if pending.error is not None:
            raise CheckpointError(f"checkpoint of step {pending.step} failed: {pending.error}") from pending.error

    def _wait_staged(self) -> None:
        """The strategy's ``before_update`` under async saves, and the first part of ``wait``: the
        step about to change the parameters and the optimizer state waits until the save in
        flight has copied them (on the writer thread, while this step's forward and backward ran).
        Then, once per save and alike on every rank (a collective on a gloo group of its own),
        whether any rank saw a copied tensor change in place meanwhile (``Stager.changed``): if so,
        the save is dropped instead of committed (its copy may mix two steps; its writer waits for
        this verdict before the commit's agreement) and every later save copies everything at once.
        A verdict that cannot be reached (an interrupt, a timeout) drops the save too."""
        pending = self._pending
        if pending is None or pending.checked.is_set():
            return
        t0 = time.perf_counter()
        try:
            pending.staged.wait()
            moved = self._stager.changed()
            if collectives.any_true(bool(moved), group=self._verdict_pg) if self.world > 1 else moved:
                self._stager.eager = True
                pending.dropped = (f"a tensor it was copying changed outside the optimizer step "
                                   f"({', '.join(moved[:3]) or 'on another rank'}); dropped, not committed")
                say = log.warning if moved or self.rank0 else log.debug  # (the ranks that saw it, and rank 0)
                say("rank %d: checkpoint of step %d is dropped: %s changed in place between the save and the next "
                    "optimizer step (in the forward, or in the task: weight clipping, a max_norm embedding?), while "
                    "the background save was copying it. From now on async saves copy all state when they are "
                    "taken (training waits for that copy)",
                    self.rank, pending.step, ", ".join(moved[:5]) or "a parameter on another rank")
        except BaseException:
            pending.dropped = pending.dropped or "its copy could not be checked"  # (never committed unchecked)
            raise
        finally:
            pending.checked.set()
            self.stats["blocking_s"] += time.perf_counter() - t0

    def settle(self) -> None:
        """Give the save in flight its verdict now (see ``_wait_staged``), so that its writer can
        commit it without waiting for another optimizer step (the loop calls this before the
        final evaluation). Collective while that save's copy is unchecked."""
        self._wait_staged()

    def save(self, state, blocking: bool = False) -> None:
        """Collective: checkpoint ``state`` and the strategy at this step.

        Synchronous unless ``checkpoint.async_save``: then this rank's state is copied to host
        memory here and the files are written and committed by a background thread while training
        goes on (at most one save in flight: a new save first waits for the previous one).
        """
        self.wait()  # (its time is counted in blocking_s by wait itself)
        t0 = time.perf_counter()
        step = state.step
        token = self.best.token(step) if self.best is not None else None  # (the best pending as this save starts)
        staging = os.path.join(self.dir, layout.staging_name(step))
        background = self.stats["async"] and not blocking
        files = CheckpointFiles(staging, self.group.pg, self._stager)
        write: Optional[Callable[[], None]] = None
        rng: Any = None
        meta: Optional[str] = None
        error: Optional[BaseException] = None
        try:
            # Only what must be taken now is taken here (the RNG states, meta.json's contents as
            # compact JSON, the strategy's state staged in host memory when the write goes to the
            # background); everything else, the staging dir included, is the commit protocol's.
            rng = rng_state()  # fresh objects: serialised by the writer
            self.strategy.sync_buffers()  # (rank 0's BatchNorm statistics: DCP keeps one rank's copy)
            small, write = self.strategy.save_checkpoint(files, stage=background)
            meta = json.dumps(self._meta(state, small)) if self.rank0 else None
        except Exception as exc:  # noqa: BLE001  (every rank must reach the agreement in the commit)
            error = exc
            log.error("rank %d could not prepare checkpoint step %d: %s", self.rank, step, exc)
        commit = lambda: self._committer.run(step, staging, write, rng, meta, error)  # noqa: E731
        if background:  # (a failure, this rank's or another's, is raised by the next wait())
            if self._writer is None:
                self._writer = _Writer()
            self._pending = self._writer.submit(self._background(step, staging, write, rng, meta, error,
                                                                 files.share_digest, token))
        else:
            t1 = time.perf_counter()
            try:
                commit()
            except BaseException:
                self._committed(step, ok=False, token=token)
                raise
            finally:
                self.stats["write_s"] += time.perf_counter() - t1
                self.stats["blocking_s"] += time.perf_counter() - t0
            self._committed(step)
        self.last_step = step
        self.stats["saves"] += 1
        if background:
            self.stats["blocking_s"] += time.perf_counter() - t0

    def _shares_add_up(self, digest: int, failed: bool, step: int) -> bool:
        """Collective, on the writer thread (one all-reduce on the checkpoint group, by every rank
        at every background save while sharing is on, whatever failed): did every rank stage its
        share of the replicated tensors from the same list (``digest``: ``files.share_digest``),
        so that together they hold the whole state? If not, and no rank failed (a failed save is
        aborted in its commit anyway), sharing stops on every rank from the next save on."""
        t = torch.tensor([digest, -digest, int(failed)], dtype=torch.int64)
        collectives.all_reduce(t, "max", self.group.pg)
        if int(t[2]) or int(t[0]) == -int(t[1]):
            return True
        self._stager.share = False  # (read by the next save, after its wait() for this one)
        if self.rank0:
            log.warning("checkpoint of step %d is dropped: the ranks' replicated tensors differ (names, shapes or "
                        "dtypes), so the shares they staged do not make up the whole state; async saves stage the "
                        "whole state on every rank from now on", step)
        return False

    def _background(self, step: int, staging: str, write: Optional[Callable[[], None]], rng: Any,
                    meta: Optional[str], error: Optional[BaseException], share_digest: int,
                    token: Any = None) -> _Pending:
        """The writer thread's job for an async save: first the ranks' check that their staged
        shares make up the whole state (``_shares_add_up``: if not, the save is dropped), then the
        copies ``stage`` deferred (then the next optimizer step may go ahead), then the commit
        protocol, whose write also waits for the training thread's verdict on those copies (a
        dropped save fails its write on every rank, so all abort it alike). A failed copy is this
        rank's failure to prepare: every rank still meets in the commit and aborts the save alike."""
        pending = _Pending(step)

        def checked_write() -> None:
            write()
            pending.checked.wait()  # the training thread's verdict on the copy (_wait_staged)
            if pending.dropped is not None:
                raise SaveDropped(pending.dropped)

        def job() -> None:
            failed = error
            if self.world > 1 and self._stager.share:
                try:
                    if not self._shares_add_up(share_digest, failed is not None, step):
                        pending.dropped = ("the ranks' replicated tensors differ: their staged shares do not make up "
                                           "the whole state; dropped, not committed")
                        failed = SaveDropped(pending.dropped)
                except Exception as exc:  # noqa: BLE001
                    failed = failed or exc
            if failed is None:
                try:
                    self.faults.delay("slow_staging")
                    self._stager.finish()
                except Exception as exc:  # noqa: BLE001
                    failed = exc
                    log.error("rank %d could not copy checkpoint step %d to host memory: %s", self.rank, step, exc)
            else:
                self._stager.discard()
            pending.staged.set()
            try:
                self._committer.run(step, staging, checked_write if write is not None else None, rng, meta, failed)
            except BaseException:
                self._committed(step, ok=False, token=token)
                raise
            self._committed(step)  # (here: best.json names it before any later save's prune, or a crash)

        pending.fn = job
        return pending

    def _meta(self, state, small: Dict[str, Any]) -> Dict[str, Any]:
        return {
            **small,  # the strategy's own: scheduler, scaler, ...
            "format": layout.FORMAT,
            "kind": self.strategy.checkpoint_kind,
            "step": state.step,
            "train_state": {k: v for k, v in state.state_dict().items() if k != "resumed_from_step"},
            "strategy": self.strategy.name,
            "world_size": self.world,
            "micro_global_batch": self.micro_global_batch,
            "train_samples": self.train_samples,
            "grad_accum_steps": self.grad_accum_steps,
            "mlflow_run_id": self.run_id(),
            "config": self.config,
            "torch_version": torch.__version__,
            "created_unix": time.time(),
        }

    def close(self) -> None:
        """Release the staging buffers. A save still in flight here means the run failed: it is
        not waited for (peers may be gone); its staging dir is removed at the next start."""
        pending = self._pending
        if pending is not None and not pending.checked.is_set():
            pending.dropped = "the run stopped before the save's copy was checked"
            pending.checked.set()  # (its writer, blocked on the verdict, aborts the save)
        if self.strategy.__dict__.get("before_update") == self._wait_staged:
            del self.strategy.before_update
        if self._writer is not None:
            self._writer.stop()
            self._writer = None
        self._stager.close()


__all__ = ["CheckpointError", "CheckpointManager", "CheckpointRefused"]
