"""One training job from a validated config: the one-way flow

    config -> process group -> parts (strategy, data) -> loop -> checkpoint, logging

and the run directory of the contract (config.yaml, metrics.jsonl, summary.json).
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from dist_train.checkpoint import CheckpointManager, CheckpointRefused, digest, export_run
from dist_train.checkpoint.layout import write_atomic, write_json_atomic
from dist_train.config import ConfigError, to_dict, to_yaml
from dist_train.env.cluster import ClusterEnv
from dist_train.env.collectives import broadcast_object
from dist_train.env.faults import Faults
from dist_train.env.preemption import EXIT_PREEMPTED, EarlySignals, PreemptionWatcher, keep_launcher_from_restarting
from dist_train.env.process_group import group_restarts, process_group
from dist_train.env.seed import deterministic_kernels
from dist_train.logging.console import setup_console
from dist_train.logging.jsonl import last_step
from dist_train.logging.metrics import build_metric_logger
from dist_train.logging.mlflow import describe_run
from dist_train.logging.progress import Progress
from dist_train.logging.sample_ids import record_sample_ids, trim_other_ranks
from dist_train.strategy import resolve_name, strategy_class
from dist_train.train.build import JobParts, UserObjects, build_parts
from dist_train.train.evaluate import Evaluator
from dist_train.train.loop import micro_batches, train
from dist_train.train.goodput import GoodputLedger
from dist_train.train.goodput import describe as describe_goodput
from dist_train.train.nonfinite import NonFiniteGuard
from dist_train.train.phases import STARTUP, TEARDOWN, PhaseClock, Watchdog
from dist_train.train.reporting import Reporter
from dist_train.train.optim import steps_for_epochs
from dist_train.train.state import TrainState
from dist_train.train.tasks import batches_without_indices

log = logging.getLogger("dist_train")


def set_cpu_threads(cluster: ClusterEnv) -> None:
    """Split this node's cores between its local ranks (torchrun would give each only one).

    When a scheduler has already bound this task to a subset of the cores (SLURM CPU binding),
    that subset is this rank's alone and is used whole.
    """
    if torch.cuda.is_available():
        return
    total = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    share = usable if usable < total else usable // max(cluster.local_world_size, 1)
    torch.set_num_threads(max(1, share))


@dataclass
class Outcome:
    code: int                          # the process exit code of the contract
    summary: Dict[str, Any]            # this rank's summary (rank 0's is summary.json)
    error: Optional[BaseException] = None


def enable_nccl_flight_recorder(run_dir: str) -> None:
    """On GPUs: NCCL's flight recorder keeps the last collectives of each rank and dumps them to
    ``<run.dir>/hangs/nccl_trace_rank_<r>`` when a collective times out (read before the group
    starts; a user's own settings win)."""
    if not torch.cuda.is_available():
        return
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.path.join(os.path.abspath(run_dir), "hangs", "nccl_trace_rank_"))
    os.makedirs(os.path.join(run_dir, "hangs"), exist_ok=True)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); unknown counts as yes."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def run_job(job, cluster: ClusterEnv, user: Optional[UserObjects] = None) -> int:
    """Train ``job`` on this process's share of the cluster; return the process exit code."""
    return run(job, cluster, user).code


def run(job, cluster: ClusterEnv, user: Optional[UserObjects] = None) -> Outcome:
    """Train ``job`` (with fit's ``user`` objects, if any) on this rank."""
    restore_console = setup_console(cluster, job.logging.level, own_process=user is None)  # (fit: the user's stays)
    t_start, started_unix = time.perf_counter(), time.time()
    name = resolve_name(job.strategy.name, cluster.world_size)
    summary = _new_summary(job, cluster, name)
    if cluster.is_rank0:
        os.makedirs(job.run.dir, exist_ok=True)
        with open(os.path.join(job.run.dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(to_yaml(job))
        # An earlier attempt's outcome: this attempt writes its own when it ends. Kept, summary.json
        # would say "completed" (or "preempted") of a rerun that was then killed (SIGKILL, OOM),
        # and a script deciding about a requeue would believe it.
        _remove_summaries(job.run.dir)
    set_cpu_threads(cluster)
    enable_nccl_flight_recorder(job.run.dir)
    metrics = build_metric_logger(job.run.dir, cluster.is_rank0, job.logging.mlflow, job.logging.tensorboard)
    state, code, error, preemption, early = TrainState(), 1, None, None, None
    clock, watchdog = PhaseClock(STARTUP), None  # (the watchdog: from the process group to its end)
    settled = False  # the training's outcome is known (completed or preempted): a later error does not undo it
    try:
        with deterministic_kernels(job.train.deterministic), \
                process_group(cluster, always=strategy_class(name).needs_process_group,
                              init_timeout_s=job.dist.init_timeout_s, backend=job.dist.backend) as device:
            # A preemption while the job is built: its watcher stops at the first step. (Not during
            # the rendezvous: a signal still ends a process that waits for peers that may never come.)
            early = EarlySignals()
            clock.enter(STARTUP)  # (from now: the rendezvous, however long the ranks took to come, is behind)
            watchdog = _start_watchdog(job, cluster, clock)
            # The same count on every rank, whichever node's worker failed (torchrun's own is per node).
            restarts = group_restarts()
            summary.update(restarts=cluster.elastic_restarts if restarts is None else restarts,
                           requeues=cluster.requeues)
            log.info("run %s: %s on %d process(es), device %s, precision %s, run dir %s",
                     job.run.name, name, cluster.world_size, device.type, job.train.precision, job.run.dir)
            if job.train.precision == "bf16" and device.type == "cpu" and cluster.is_rank0 and not cpu_has_native_bf16():
                log.warning("train.precision=bf16 on a CPU without native bf16 (%s): its matrix products and "
                            "convolutions are emulated, many times slower than fp32 (a 3x3 convolution took 40x "
                            "as long on an AVX2 machine); train.precision=fp32 is the fast choice on this machine",
                            torch.backends.cpu.get_cpu_capability())
            parts = build_parts(job, cluster, device, user)
            clock.progress()  # (each stage of the start-up has its own bound: the data may take long to build)
            try:
                preemption = PreemptionWatcher(parts.strategy.device, early)  # collective: a gloo group of its own
                preempted, signalled = _train(job, cluster, parts, state, metrics, summary, started_unix, preemption,
                                              clock)
                clock.enter(TEARDOWN)
                if parts.strategy.caller_module is not None:  # (collective) fit's instance gets the weights
                    parts.strategy.hand_back(parts.strategy.caller_module)
            finally:
                parts.close()
            summary["status"], code = ("preempted", EXIT_PREEMPTED) if preempted else ("completed", 0)
            _close_summary(summary, state, t_start, metrics, code)  # (before it is shared: rank 0's wall_s, run id)
            settled = True
            if cluster.world_size > 1:  # fit returns summary.json's dict on every rank: rank 0's
                shared = broadcast_object(summary if cluster.is_rank0 else None)
                if not cluster.is_rank0:
                    summary.update(shared)
            if preempted:  # (a signal held off since the training ended came to this rank as well)
                keep_launcher_from_restarting(cluster, signalled or preemption.late_signal is not None)
    except (CheckpointRefused, ConfigError) as exc:  # the same verdict on every rank: a usage error
        code = 2
        if cluster.is_rank0:
            log.error("bad checkpoint: %s" if isinstance(exc, CheckpointRefused) else "bad config: %s", exc)
        summary["error"], error = f"{type(exc).__name__}: {exc}", exc.with_traceback(None)
    except Exception as exc:
        if settled:  # (sharing the summary, or the group's teardown: the checkpoint and the outcome stand)
            log.error("rank %d: error after the run had %s, which stands: %s: %s", cluster.rank, summary["status"],
                      type(exc).__name__, exc)
        else:
            code, summary["status"] = 1, "failed"
            log.error("rank %d failed: %s%s\n%s", cluster.rank, exc, _peer_hint(exc), traceback.format_exc())
            # Kept without its traceback: the frames would keep the data pipeline alive.
            notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))  # (what dist_train added to it)
            summary["error"] = f"rank {cluster.rank}: {type(exc).__name__}: {exc}{notes}{_peer_hint(exc)}"
            error = exc.with_traceback(None)
    except KeyboardInterrupt:  # Ctrl-C: no checkpoint (that is what SIGTERM/SIGUSR1 are for); said so, and raised on
        code = 130  # (what the shell reports for a process ended by SIGINT)
        summary["error"] = f"rank {cluster.rank}: interrupted (KeyboardInterrupt, Ctrl-C) at step {state.step}"
        log.warning("rank %d: interrupted at step %d; no checkpoint taken (a rerun resumes from the last one)",
                    cluster.rank, state.step)
        raise
    finally:
        if watchdog is not None:
            watchdog.close()
        if summary.get("exit_code") != code:  # (a failure: not closed on the way out of the try)
            _close_summary(summary, state, t_start, metrics, code, job)
        try:
            _finish(job, cluster, summary, metrics, fit=user is not None)
            _await_digests(code)
        finally:
            pending = None  # a signal held off that the run did not act on
            if preemption is None:  # failed before the training: the handlers from before back
                if early is not None:
                    early.release()
                    pending = early.signal_name
            elif user is not None:
                # fit in the user's process: their own handlers back. (The CLI's process exits now:
                # a launcher's SIGTERM from here on finds summary.json written.)
                preemption.release()
                pending = preemption.late_signal if preemption.signal_name is None else None
            restore_console()
            if pending is not None and user is not None:
                # fit: the caller's handler gets the signal that was meant for its process (a sweep
                # going on after this run must still stop when the scheduler says so).
                signal.raise_signal(signal.Signals[pending])
    return Outcome(code, summary, error)


_DIGEST_WAIT_S = 120.0  # how long the end of a run waits for its checkpoints' SHA-256 checksums
_DIGEST_WAIT_FAILED_S = 5.0  # the same after a failure (a rank that is gone never sends its own)


def _await_digests(code: int) -> None:
    """The SHA-256 checksums of this run's checkpoints, which every rank takes of the files it wrote
    and rank 0 adds to the manifests, in the background (``checkpoint/digest.py``): waited for after
    summary.json is written, so that a preempted run's outcome is on disk first, and for a bounded
    time (a process that exits leaves the rest out: the checkpoints are complete and verify without)."""
    t0 = time.perf_counter()
    limit = _DIGEST_WAIT_S if code in (0, EXIT_PREEMPTED) else _DIGEST_WAIT_FAILED_S
    if not digest.wait(timeout=limit):
        log.warning("the SHA-256 checksums of the newest checkpoint were not recorded within %.0f s; it is "
                    "complete and verifies without them (XXH3-128)", limit)
    elif time.perf_counter() - t0 > 5:
        log.info("recorded the SHA-256 checksums of the checkpoints in %.1f s", time.perf_counter() - t0)


MLFLOW_RUN_FILE = ".mlflow_run_id"  # in the run dir: the MLflow run of the job's latest attempt


def _mlflow_run_to_continue(job, cluster: ClusterEnv, summary: Dict[str, Any], manager) -> Optional[str]:
    """The MLflow run this attempt continues: the resumed checkpoint's; else, for a torchrun restart
    or a SLURM requeue of an attempt that ended before its first checkpoint (the same job, from
    step 0), the run that attempt opened (a new launch from scratch opens a new one)."""
    if not cluster.is_rank0:
        return manager.resumed_run_id
    if not (summary.get("restarts") or summary.get("requeues")):
        # A new launch: an earlier launch's run id must not be taken by this one's restarts.
        with contextlib.suppress(OSError):
            os.remove(os.path.join(job.run.dir, MLFLOW_RUN_FILE))
        return manager.resumed_run_id
    if manager.resumed_run_id:
        return manager.resumed_run_id
    try:
        with open(os.path.join(job.run.dir, MLFLOW_RUN_FILE), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _remove_summaries(run_dir: str) -> None:
    for stale in [os.path.join(run_dir, "summary.json"),
                  *glob.glob(os.path.join(glob.escape(run_dir), "summary.rank*.json"))]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)


def _steps_for_epochs_left(job, cluster: ClusterEnv, parts, state: TrainState, manager) -> None:
    """``train.epochs``: ``train.max_steps`` from where the run stands, once the data is built and
    the checkpoint resumed (``optim.steps_for_epochs``; the schedule reads it at each step), and
    config.yaml told."""
    sampler = parts.sampler
    job.train.max_steps = steps_for_epochs(job.train.epochs, sampler.batches_per_epoch, job.train.grad_accum_steps,
                                           step=state.step, epoch=state.epoch,
                                           batches_done=state.position // sampler.global_batch_size)
    manager.config.setdefault("train", {})["max_steps"] = job.train.max_steps
    if state.step and not parts.strategy.settings_from_checkpoint:
        # The resume set this step's rate from a schedule (cosine, linear) over train.max_steps' value then.
        parts.strategy.keep_optimizer_settings(parts.strategy.optimizer_settings())
    if cluster.is_rank0:
        path = os.path.join(job.run.dir, "config.yaml")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(to_yaml(job))
        os.replace(path + ".tmp", path)
        log.info("train.epochs=%d: %d optimizer steps in all (%d micro-batches of %d samples per epoch%s)",
                 job.train.epochs, job.train.max_steps, sampler.batches_per_epoch, sampler.global_batch_size,
                 f"; resumed at step {state.step}, epoch {state.epoch}" if state.step else "")


def record_refused(job, cluster: ClusterEnv, exc: ConfigError, partial: bool = False) -> None:
    """A config refused before the run started (exit 2), in a run dir that exists already: its
    summary.json says so, instead of an earlier attempt's outcome that a script deciding about a
    requeue would believe. (A run dir that does not exist is not made for a config refused.)
    ``partial``: ``job`` holds only the run's own keys (the rest did not load): what it would have
    trained is left null."""
    if not cluster.is_rank0 or not os.path.isdir(job.run.dir):
        return
    try:
        _remove_summaries(job.run.dir)
        summary = _new_summary(job, cluster, job.strategy.name)
        if partial:
            summary.update(strategy=None, precision=None, model=None, dataset=None)
        steps, samples = kept_progress(job)
        summary.update(exit_code=2, error=f"ConfigError: {exc}", steps=steps, samples_seen=samples)  # (2: usage)
        write_json_atomic(os.path.join(job.run.dir, "summary.json"), summary)
    except OSError as exc2:  # (an unwritable run dir is the config's problem, reported already)
        log.debug("summary.json of the refused config not written: %s", exc2)


def _start_watchdog(job, cluster: ClusterEnv, clock: PhaseClock) -> Optional[Watchdog]:
    """The hang watchdog of this rank (``dist.watchdog_floor_s=0``: none). It fires before the
    collective timeout that would end a hung job: ``dist.init_timeout_s``'s until the first step is
    done, ``dist.timeout_s``'s after; a single process has no such bound."""
    if job.dist.watchdog_floor_s <= 0:
        return None
    multi = cluster.world_size > 1
    return Watchdog(clock, job.run.dir, cluster.rank, job.dist.watchdog_factor, job.dist.watchdog_floor_s,
                    collective_timeout_s=job.dist.timeout_s if multi else float("inf"),
                    first_step_timeout_s=job.dist.init_timeout_s if multi else float("inf"))


def _remember_mlflow_run(run_dir: str, run_id: str) -> None:
    try:
        write_atomic(os.path.join(run_dir, MLFLOW_RUN_FILE), run_id + "\n", sync_file=False)
    except OSError as exc:
        log.warning("could not record the MLflow run id in %s: %s", run_dir, exc)


def kept_progress(job) -> Tuple[int, int]:
    """``(steps, samples)`` the newest checkpoint of ``job``'s run dir holds ((0, 0): none, or
    ``checkpoint.resume=never``): a run's progress so far when this attempt stopped before it
    resumed (a config or checkpoint refused, a failure during the start-up). Read from its
    meta.json, not verified: what summary.json reports, not what a resume loads."""
    from dist_train.checkpoint import layout
    from dist_train.checkpoint.restore import read_meta

    if str(job.checkpoint.resume) == "never":
        return 0, 0
    for _, path in layout.committed(os.path.join(job.run.dir, layout.CHECKPOINTS)):
        try:
            train_state = read_meta(path)["train_state"]
            return int(train_state["step"]), int(train_state.get("samples_seen", 0))
        except Exception:  # noqa: BLE001  (any unreadable one: the next older)
            continue
    return 0, 0


def _close_summary(summary: Dict[str, Any], state: TrainState, t_start: float, metrics, code: int,
                   job=None) -> None:
    if job is not None and state.step == 0 and state.resumed_from_step is None:
        state.step, state.samples_trained = kept_progress(job)  # (stopped before it resumed: the run's so far)
    summary.update(steps=state.step, samples_seen=state.samples_trained, resumed_from_step=state.resumed_from_step,
                   skipped_steps=state.skipped_steps, nonfinite_steps=state.nonfinite_steps,
                   wall_s=round(time.perf_counter() - t_start, 3),
                   mlflow_run_id=metrics.run_id or summary.get("mlflow_run_id"), exit_code=code)


def _train(job, cluster: ClusterEnv, parts: JobParts, state: TrainState, metrics, summary: Dict[str, Any],
           started_unix: float, preemption: PreemptionWatcher, clock: PhaseClock) -> Tuple[bool, bool]:
    """Resume, run the loop, save the final checkpoint; (whether the run was preempted, whether
    this rank itself got a preemption signal). ``preemption`` is closed on the way out: from then on
    it holds the preemption signals off until ``run`` has written the summary."""
    faults = Faults(job.debug.faults)
    strategy = parts.strategy
    ledger = GoodputLedger(job.run.dir, cluster.is_rank0, started_unix)
    manager = CheckpointManager(job.checkpoint, job.run.dir, strategy, config=to_dict(job),
                                micro_global_batch=parts.sampler.global_batch_size,
                                train_samples=parts.sampler.num_samples,
                                grad_accum_steps=job.train.grad_accum_steps, seed=job.run.seed,
                                run_id=lambda: metrics.run_id, faults=faults)
    progress = data = reporter = evaluator = None
    try:
        if manager.best is not None and parts.eval_loader is None:  # (alike on every rank)
            raise ConfigError("checkpoint.best_metric", "needs held-out data to evaluate: this run has none")
        # Collective: the newest verified checkpoint (or the one asked for), restored before
        # anything is logged, so metrics.jsonl and MLflow continue the resumed timeline.
        faults.delay("startup_stall", cluster.rank)
        manager.resume(state)
        if job.train.epochs:
            _steps_for_epochs_left(job, cluster, parts, state, manager)
        clock.step = state.step  # (a hang report names the step it waits to take)
        clock.progress()
        logged_before = last_step(os.path.join(job.run.dir, "metrics.jsonl")) if cluster.is_rank0 else 0
        params, tags = describe_run(job, cluster, strategy.name)  # collective: gathers host names
        clock.progress()
        metrics.start(params, tags, resume_run_id=_mlflow_run_to_continue(job, cluster, summary, manager),
                      resume_step=state.step)
        if cluster.is_rank0 and metrics.run_id:
            _remember_mlflow_run(job.run.dir, metrics.run_id)
        progress = Progress(job.train.max_steps, state.step, job.logging.progress_bar, job.logging.every_steps,
                            enabled=cluster.is_rank0)
        reporter = Reporter(strategy, metrics, progress, every=job.logging.every_steps, max_steps=job.train.max_steps,
                            global_batch=parts.global_batch, tokens_per_sample=parts.tokens_per_sample,
                            grad_norms=job.logging.grad_norms, clock=clock, flops=parts.flops, start_step=state.step)
        evaluator = Evaluator(strategy, parts.eval_loader, parts.task, job.eval, reporter.log_eval,
                              progress=clock.progress)
        reporter.evaluates = evaluator.scheduled  # (an evaluated step gets a record: its grad norms too)
        if state.step >= job.train.max_steps:  # a rerun of a finished run: its final evaluation is logged
            evaluator.already_done(state.step, broadcast_object(metrics.logged_at(state.step, "eval_")))
            if state.step > job.train.max_steps and cluster.is_rank0:
                log.warning("the checkpoint resumed is at step %d, past train.max_steps=%d: nothing to train (a run "
                            "is not shortened; raise train.max_steps to go on, or start afresh with another run.dir "
                            "or checkpoint.resume=never)", state.step, job.train.max_steps)
        data = micro_batches(parts.loader, parts.sampler, state)
        if faults.active:
            faults.arm_fork_hang(cluster.rank)  # (the training loader forks its workers first)
            data = faults.wrap(data, state, cluster.rank)
        if job.debug.record_sample_ids:
            if cluster.is_rank0:
                trim_other_ranks(job.run.dir, cluster.world_size, state.step)
            data = record_sample_ids(data, state, os.path.join(job.run.dir, f"sample_ids.rank{cluster.rank}.jsonl"))
        data = batches_without_indices(data)  # a task gets the dataset's items as collated
        guard = NonFiniteGuard(job.train.nonfinite, job.train.nonfinite_patience, strategy.device)
        ledger.begin(state.step, time.time() - started_unix, logged_before,
                     relaunched=bool(summary.get("restarts") or summary.get("requeues")))
        clock.reset()  # the breakdown (each record's and the run's) starts with the loop
        preempted = train(strategy, data, state, job.train, task=parts.task, reporter=reporter, evaluator=evaluator,
                          checkpointer=manager, preemption=preemption, guard=guard, clock=clock, ledger=ledger,
                          faults=faults, timeout_s=job.dist.timeout_s,
                          epoch_end=parts.sampler.batches_per_epoch * parts.sampler.global_batch_size)
        with clock("checkpoint"):
            metrics.flush()  # every record on disk (TensorBoard's queued events too) before the commit
            manager.finalize(state)  # the end-of-run (or preemption) checkpoint; every async save committed
        # Preempted at the last step, the loop skipped the final evaluation: still "preempted" (exit 3,
        # so the scheduler requeues it), and the resumed run evaluates without training further.
        stopped = preempted and (state.step < job.train.max_steps or evaluator.final_pending(state.step))
        summary["time_breakdown"] = {k: round(v, 3) for k, v in clock.totals.items()}
        summary["goodput"] = ledger.finish(state.step, clock, completed=not stopped)
        if cluster.is_rank0:
            log.info(describe_goodput(summary["goodput"]))
        summary.update(reporter.summary(), **evaluator.last)
        summary["checkpoint"] = dict(manager.stats, last_step=manager.last_step)
        if manager.best is not None:
            summary["best"] = manager.best.summary()
        return stopped, preemption.signal_name is not None
    finally:
        if "checkpoint" not in summary:  # a failed attempt: what it measured is reported all the same
            try:
                summary["time_breakdown"] = {k: round(v, 3) for k, v in clock.totals.items()}
                if reporter is not None:
                    summary.update({k: v for k, v in reporter.summary().items() if v is not None})
                if evaluator is not None:
                    summary.update(evaluator.last)
                summary["checkpoint"] = dict(manager.stats, last_step=manager.last_step)
                if manager.best is not None:
                    summary["best"] = manager.best.summary()
            except Exception as exc:  # (never in the way of the failure being reported)
                log.warning("summary: the failed attempt's measurements not recorded: %s", exc)
        if "goodput" not in summary and ledger.begun:  # a failed attempt: its time stays in the ledger
            try:
                summary["goodput"] = ledger.finish(state.step, clock)
            except Exception as exc:  # (never in the way of the failure being reported)
                log.warning("goodput: not recorded for this failed attempt: %s", exc)
        if data is not None:
            data.close()  # the loader's iterator (and its worker processes) with it
        preemption.close()
        manager.close()
        if progress is not None:
            progress.close()


def _new_summary(job, cluster: ClusterEnv, strategy_name: str) -> Dict[str, Any]:
    return {
        "status": "failed", "strategy": strategy_name, "world_size": cluster.world_size,
        "num_nodes": cluster.num_nodes, "precision": job.train.precision, "model": job.model.name,
        "dataset": job.data.name, "steps": 0, "samples_seen": 0, "train_loss": None, "eval_loss": None,
        "eval_accuracy": None, "samples_per_s": None, "wall_s": None, "resumed_from_step": None,
        "mlflow_run_id": None,
    }


def _finish(job, cluster: ClusterEnv, summary: Dict[str, Any], metrics, fit: bool = False) -> None:
    """summary.json, the exported weights for MLflow, the final log line; then close the logger.
    ``fit``: the run is ``dist_train.fit``'s, which returns its summary (no exit code of its own)."""
    code = summary["exit_code"]
    if cluster.is_rank0 or code not in (0, EXIT_PREEMPTED):
        # A failing rank other than 0 writes its own summary next to rank 0's: rank 0 may be
        # blocked in a collective and never learn why the job died.
        os.makedirs(job.run.dir, exist_ok=True)
        name = "summary.json" if cluster.is_rank0 else f"summary.rank{cluster.rank}.json"
        write_json_atomic(os.path.join(job.run.dir, name), summary)
        if cluster.is_rank0 and code not in (0, EXIT_PREEMPTED) and _peer_gone(summary.get("error")):
            cause = first_failure(job.run.dir, cluster.world_size)
            if cause:  # (written again: a launcher that kills this rank meanwhile leaves the first)
                summary["error"] = f"{cause} (then {summary['error']})"
                write_json_atomic(os.path.join(job.run.dir, name), summary)
    if code == 0 and cluster.is_rank0 and job.logging.mlflow.enabled and job.logging.mlflow.log_model:
        out = os.path.join(os.path.abspath(job.run.dir), "model", "model.safetensors")
        try:
            export_run(job.run.dir, out)
            metrics.add_artifact(out, "model")
        except Exception as exc:  # noqa: BLE001  (the run itself succeeded)
            log.warning("logging.mlflow.log_model: could not export the final weights: %s; not logged", exc)
    metrics.close(summary["status"])  # after the summary: it is logged to MLflow as an artifact
    if code == 0:
        # (a task's own evaluation metrics, eval_<name>, after the loss; eval_accuracy when there is one)
        evals = [k for k, v in summary.items() if k.startswith("eval_") and k != "eval_loss"
                 and isinstance(v, (int, float)) and not isinstance(v, bool)] or ["eval_accuracy"]
        log.info("done: %d steps, train_loss %s, eval_loss %s, %s, %s samples/s, %.1f s", summary["steps"],
                 _f(summary["train_loss"]), _f(summary["eval_loss"]),
                 ", ".join(f"{k} {_f(summary.get(k))}" for k in evals), _f(summary["samples_per_s"], ".1f"),
                 summary["wall_s"])
    elif code == EXIT_PREEMPTED:
        if fit:
            log.warning("preempted at step %d: checkpoint saved; fit returns status 'preempted' (run it again "
                        "to resume)", summary["steps"])
        else:
            log.warning("preempted at step %d: checkpoint saved; exit %d (requeue the job to resume)",
                        summary["steps"], code)


# What a collective raises on a rank whose peer died (gloo; NCCL): the peer, not this rank, failed.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted")


# What DDP raises when some parameters got no gradient in a step (a branch not taken, a head left
# unused): torch names its own keyword, not dist_train's key.
_UNUSED_PARAMETERS = ("Expected to have finished reduction in the prior iteration",
                      "parameters that were not used in producing loss")


# What torchvision's vision transformers raise for images of another size than they were built for.
_IMAGE_SIZE = ("Wrong image height!", "Wrong image width!")


def _peer_gone(error: Optional[str]) -> bool:
    return bool(error) and any(words in error for words in _PEER_GONE)


def first_failure(run_dir: str, world_size: int, wait_s: float = 2.0) -> Optional[str]:
    """The error of the rank that failed first, from the ``summary.rank<N>.json`` files the failing
    ranks write (its own error, not a collective's report that a peer is gone), waiting up to
    ``wait_s`` for one (that rank may still be writing it); None: none says more (a rank that died
    hard writes none). The first: the oldest file."""
    deadline = time.monotonic() + wait_s
    while True:
        causes = []
        for rank in range(1, world_size):
            path = os.path.join(run_dir, f"summary.rank{rank}.json")
            try:
                with open(path, encoding="utf-8") as f:
                    error = json.load(f).get("error")
                mtime = os.stat(path).st_mtime
            except (OSError, ValueError, AttributeError):
                continue
            if error and not _peer_gone(error):
                causes.append((mtime, rank, error))
        if causes or time.monotonic() >= deadline:
            return min(causes)[2] if causes else None
        time.sleep(0.1)


def _peer_hint(exc: BaseException) -> str:
    if any(words in str(exc) for words in _IMAGE_SIZE):
        return (" (the model takes images of another size than the dataset's: resize them with data.resize, e.g. "
                "data.resize=224 for torchvision's ViTs)")
    if _peer_gone(str(exc)):
        return (" (another rank is gone: it failed first, and its summary.rank<N>.json or the launcher's "
                "'rank N failed first' line says why)")
    if any(words in str(exc) for words in _UNUSED_PARAMETERS):
        return (" (some parameters got no gradient in a step: set strategy.find_unused_parameters=true, or freeze "
                "them with model.freeze)")
    return ""


def _f(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)
