"""One training job from a validated config: the one-way flow

    config -> process group -> strategy -> data -> loop -> checkpoint, logging

and the run directory of the contract (config.yaml, metrics.jsonl, summary.json).
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from typing import Any, Dict

import torch

from dist_train.checkpoint import EXIT_PREEMPTED, CheckpointManager, CheckpointRefused
from dist_train.checkpoint.preemption import shield_workers
from dist_train.config import to_dict, to_yaml
from dist_train.data import build_datasets
from dist_train.data.loader import build_eval_loader, build_train_loader
from dist_train.env.cluster import ClusterEnv
from dist_train.env.process_group import process_group
from dist_train.env.seed import seed_everything
from dist_train.logging.console import setup_console
from dist_train.logging.metrics import build_metric_logger
from dist_train.logging.mlflow import describe_run
from dist_train.logging.progress import Progress
from dist_train.models import build_model
from dist_train.strategy import NEEDS_GROUP, StepPlan, build_strategy, resolve_name
from dist_train.train.loop import Hooks, micro_batches, record_sample_ids, train
from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory
from dist_train.train.state import TrainState

log = logging.getLogger("dist_train")


def write_json_atomic(path: str, payload: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def run_job(job, cluster: ClusterEnv) -> int:
    """Train ``job`` on this process's share of the cluster; return the process exit code."""
    setup_console(cluster, job.logging.level)
    t_start = time.perf_counter()
    run_dir = job.run.dir
    strategy_name = resolve_name(job.strategy.name, cluster.world_size)
    summary: Dict[str, Any] = {
        "status": "failed", "strategy": strategy_name, "world_size": cluster.world_size,
        "num_nodes": cluster.num_nodes, "precision": job.train.precision, "model": job.model.name,
        "dataset": job.data.name, "steps": 0, "samples_seen": 0, "train_loss": None, "eval_loss": None,
        "eval_accuracy": None, "samples_per_s": None, "wall_s": None, "resumed_from_step": None,
        "mlflow_run_id": None,
    }
    if cluster.is_rank0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(to_yaml(job))
    set_cpu_threads(cluster)
    metrics = build_metric_logger(run_dir, cluster.is_rank0, job.logging.mlflow)
    state = TrainState()
    code = 1
    try:
        with process_group(cluster, always=strategy_name in NEEDS_GROUP, init_timeout_s=job.dist.init_timeout_s) as device:
            log.info("run %s: %s on %d process(es), device %s, precision %s, run dir %s",
                     job.run.name, strategy_name, cluster.world_size, device.type, job.train.precision, run_dir)
            seed_everything(job.run.seed)
            train_ds, eval_ds, info = build_datasets(job.data)
            plan = StepPlan(job.data.batch_size, job.train.grad_accum_steps, job.train.grad_clip)
            strategy = build_strategy(job.strategy, cluster, device, job.train.precision, plan)
            with strategy.init_context():  # FSDP meta_init: the meta device, shards materialised in setup
                model = build_model(job.model, info)
            strategy.setup(model, make_optimizer_factory(job.train), make_scheduler_factory(job.train))
            loader, sampler = build_train_loader(train_ds, job.data, rank=cluster.rank, world_size=cluster.world_size,
                                                 seed=job.run.seed, device=device)
            eval_loader = build_eval_loader(eval_ds, job.data, rank=cluster.rank, world_size=cluster.world_size,
                                            device=device)
            shield_workers(loader)  # SIGTERM/SIGUSR1 reach workers too: only the training process acts on them
            shield_workers(eval_loader)
            manager = CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job),
                                        micro_global_batch=sampler.global_batch_size,
                                        grad_accum_steps=job.train.grad_accum_steps, seed=job.run.seed,
                                        run_id=lambda: getattr(metrics, "run_id", None))
            progress = None
            try:
                # Collective: the newest verified checkpoint (or the one asked for), restored before
                # anything is logged, so metrics.jsonl and MLflow continue the resumed timeline.
                manager.resume(state)
                params, tags = describe_run(job, cluster, strategy_name)  # collective: gathers host names
                metrics.start(params, tags, resume_run_id=manager.resumed_run_id)
                progress = Progress(job.train.max_steps, state.step, job.logging.progress_bar,
                                    job.logging.every_steps, enabled=cluster.is_rank0)
                global_batch = sampler.global_batch_size * job.train.grad_accum_steps
                data = micro_batches(loader, sampler, state)
                if os.environ.get("DIST_TRAIN_RECORD_SAMPLE_IDS"):  # opt-in, for tests: ids each rank trained on
                    data = record_sample_ids(data, state, os.path.join(run_dir, f"sample_ids.rank{cluster.rank}.jsonl"))
                hooks = Hooks(after_step=[manager.maybe_save], stop_requested=manager.stop_requested)
                results = train(strategy, data, eval_loader, state,
                                train_cfg=job.train, eval_cfg=job.eval, log_every=job.logging.every_steps,
                                task=info.task, metrics=metrics, progress=progress, hooks=hooks,
                                global_batch=global_batch, tokens_per_sample=info.seq_len or 0)
                manager.finalize(state)  # the end-of-run (or preemption) checkpoint; every async save committed
                summary["checkpoint"] = dict(manager.stats, last_step=manager.last_step)
            finally:
                manager.close()
                if progress is not None:
                    progress.close()
                strategy.teardown()
            summary.update(results)
            # Preempted: checkpointed at the step it stopped; a distinct exit code tells the
            # scheduler to requeue, and the requeued job resumes from that checkpoint.
            preempted = manager.preempted and state.step < job.train.max_steps
            summary["status"], code = ("preempted", EXIT_PREEMPTED) if preempted else ("completed", 0)
    except CheckpointRefused as exc:  # the same verdict on every rank: a usage error, no traceback
        code = 2
        if cluster.is_rank0:
            log.error("bad checkpoint: %s", exc)
        summary["error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        log.error("rank %d failed: %s\n%s", cluster.rank, exc, traceback.format_exc())
        summary["error"] = f"rank {cluster.rank}: {type(exc).__name__}: {exc}"
    finally:
        summary.update(steps=state.step, samples_seen=state.samples_seen, resumed_from_step=state.resumed_from_step,
                       wall_s=round(time.perf_counter() - t_start, 3), mlflow_run_id=metrics.run_id, exit_code=code)
        if cluster.is_rank0 or code not in (0, EXIT_PREEMPTED):
            _write_summary(run_dir, summary, cluster)
        metrics.close(summary["status"])  # after the summary: it is logged to MLflow as an artifact
    if code == 0:
        log.info("done: %d steps, train_loss %s, eval_loss %s, eval_accuracy %s, %.1f samples/s, %.1f s",
                 state.step, _f(summary["train_loss"]), _f(summary["eval_loss"]), _f(summary["eval_accuracy"]),
                 summary["samples_per_s"] or 0.0, summary["wall_s"])
    elif code == EXIT_PREEMPTED:
        log.warning("preempted at step %d: checkpoint saved; exit %d (requeue the job to resume)", state.step, code)
    return code


def _f(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _write_summary(run_dir: str, summary: Dict[str, Any], cluster: ClusterEnv) -> None:
    """Rank 0 writes summary.json; a failing rank other than 0 writes its own next to it,
    because rank 0 may be blocked in a collective and never learn why the job died."""
    os.makedirs(run_dir, exist_ok=True)
    name = "summary.json" if cluster.is_rank0 else f"summary.rank{cluster.rank}.json"
    write_json_atomic(os.path.join(run_dir, name), summary)
