"""The job builder: config sections (or a user's own objects) in, the parts of a training job out.

    parts = build_parts(job, cluster, device)              # the CLI: everything from the config
    parts = build_parts(job, cluster, device, user)        # dist_train.fit(model, data, ...)
    parts.strategy   # model, optimizer and scheduler built, wrapped or sharded
    parts.task, parts.loader, parts.sampler, parts.eval_loader, parts.info

One sequence for every caller (the CLI's job, fit, tests, benchmarks): seed, datasets, task,
strategy, the model (built inside the strategy's init context when dist_train builds it itself;
else built whole, given ``model.init_from`` weights, and made equal on every rank), frozen
parameters, optimizer and scheduler built by the strategy over the wrapped parameters, then the
sharded loaders.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from dist_train.data.loader import build_eval_loader, build_train_loader
from dist_train.env.cluster import ClusterEnv
from dist_train.config.schema import ConfigError
from dist_train.env.collectives import all_gather_object, broadcast_module
from dist_train.env.preemption import shield_workers
from dist_train.env.seed import rank_seed, seed_everything
from dist_train.strategy import StepPlan, Strategy, build_strategy
from dist_train.train import sources
from dist_train.train.flops import StepFlops
from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory
from dist_train.train.tasks import LanguageModel, Task, split_batch, without_indices

log = logging.getLogger("dist_train")


@dataclass
class UserObjects:
    """What ``dist_train.fit`` hands over: each may be None (then the config decides)."""

    model: Any = None        # an nn.Module, or a zero-argument callable returning one
    train_data: Any = None   # a map-style Dataset, or a callable returning one
    eval_data: Any = None
    task: Any = None         # a task name, or a callable task(model, batch)
    collate_fn: Any = None   # a list of items -> a batch, for train_data and eval_data (default_collate)
    optimizer: Any = None    # own_optim.OwnOptimizer (else train.optimizer)
    scheduler: Any = None    # own_optim.OwnScheduler (else train.schedule)


@dataclass
class JobParts:
    strategy: Strategy
    task: Task
    info: Any          # the dataset description: task, input shape, classes, sequence length
    loader: Any
    sampler: Any
    eval_loader: Any   # None without held-out data
    flops: Any = None  # train.flops.StepFlops: FLOPs per sample, for tflops and mfu (None: not countable)
    tokens_per_sample: int = 0  # language models: tokens per sample (tokens_per_s); 0 otherwise

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all ranks together."""
        return self.sampler.global_batch_size * self.strategy.plan.grad_accum_steps

    def close(self) -> None:
        """Stop the DataLoader workers (persistent ones outlive an exception that ended the loop,
        and would keep the process from exiting), then release the strategy."""
        for loader in (self.loader, self.eval_loader):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None
        self.strategy.teardown()


def step_plan(job) -> StepPlan:
    return StepPlan(job.data.batch_size, job.train.grad_accum_steps, job.train.grad_clip)


def build_training(job, cluster: ClusterEnv, device: torch.device, info, model: Any = None,
                   before_setup: Optional[Callable[[nn.Module], None]] = None,
                   user: Optional[UserObjects] = None) -> Strategy:
    """The strategy with the model, optimizer and scheduler of ``job`` set up on this rank.
    ``model``: a user's module or zero-argument builder (default: ``model.name``);
    ``before_setup(module)`` sees the built module before it is wrapped (FLOP counting);
    ``user``: fit's own optimizer and scheduler, when given (else ``train``'s)."""
    strategy = build_strategy(job.strategy, cluster, device, job.train.precision, step_plan(job))
    if model is None and sources.is_builtin_model(job.model.name) and not job.model.init_from:
        with strategy.init_context():  # FSDP meta_init: the meta device, shards materialised in setup
            module = sources.make_model(job.model, info)
    else:
        # A module dist_train did not draw itself (a user's, or pretrained weights): build it
        # whole, load the weights, and give every rank rank 0's values before any wrapping.
        module = sources.make_model(job.model, info, model)
        if job.model.init_from:
            sources.init_from(module, job.model.init_from, verbose=cluster.is_rank0)
        broadcast_module(module)
    sources.freeze(module, list(job.model.freeze), verbose=cluster.is_rank0)
    # Training mode, as a plain loop's model.train(): a module handed over after an evaluation kept
    # Dropout off and BatchNorm on its running statistics. (A module that keeps parts of itself in
    # eval mode overrides train(), as in plain PyTorch; the evaluator restores this mode.)
    module.train()
    if isinstance(model, nn.Module) and strategy.shards_module:
        # The caller's instance stays whole (as under DDP, it holds the trained weights after fit):
        # a copy is sharded and trained, and the job hands the weights back (Strategy.hand_back).
        try:
            strategy.caller_module, module = module, copy.deepcopy(module)
        except Exception as exc:  # noqa: BLE001  (a module that cannot be copied: trained in place)
            if cluster.is_rank0:
                log.warning("the model cannot be copied (%s: %s): %s shards the instance itself, which stays in "
                            "pieces after fit; the trained weights are in the run's checkpoints",
                            type(exc).__name__, exc, strategy.name)
    if before_setup is not None:
        before_setup(module)
    strategy.compile = job.train.compile
    user = user or UserObjects()
    strategy.settings_from_checkpoint = user.optimizer is not None or user.scheduler is not None
    strategy.scheduler_per_step = job.train.scheduler_interval == "step"
    strategy.setup(module, user.optimizer or make_optimizer_factory(job.train),
                   user.scheduler or make_scheduler_factory(job.train))
    return strategy


def datasets_on_every_rank(make: Callable[[], tuple], world_size: int) -> tuple:
    """``make()`` (the datasets and their info) on every rank, checked together (a collective when
    ``world_size > 1``): the same ConfigError on every rank when one rank could not build its
    datasets (the others waited in the next collective until its timeout) or when the ranks'
    datasets differ in length. Each rank draws its share of one order over the indices of its own
    copy: a rank with one more sample (files listed on a node's own disk) drew from another order,
    repeating samples and dropping others every epoch without a word, and a different number of
    evaluation batches would leave the ranks waiting on each other."""
    try:
        made, failure = make(), None
    except Exception as exc:  # noqa: BLE001  (re-raised below, once every rank knows)
        if world_size == 1:
            raise
        made, failure = None, exc
    if world_size == 1:
        return made
    mine = (f"{type(failure).__name__}: {failure}"[:500] if failure is not None else None,
            None if made is None else (len(made[0]), None if made[1] is None else len(made[1])))
    everyone = all_gather_object(mine)
    if failure is not None:
        raise failure
    failed = [(r, text) for r, (text, _) in enumerate(everyone) if text]
    if failed:
        raise ConfigError("data", f"rank {failed[0][0]} could not build its datasets ({failed[0][1]})"
                                  + (f", and {len(failed) - 1} more rank(s)" if len(failed) > 1 else ""))
    for i, what in enumerate(("training", "evaluation")):
        if len({n[i] for _, n in everyone}) > 1:
            shown = ", ".join(f"rank {r}: {n[i]}" for r, (_, n) in enumerate(everyone[:8]))
            raise ConfigError("data", f"the ranks' {what} sets differ in length ({shown}{', ...' if len(everyone) > 8 else ''}"
                                      "): every rank must build the same dataset (each draws its share of one "
                                      "order over the indices); check that every node sees the same files")
    return made


def build_parts(job, cluster: ClusterEnv, device: torch.device, user: Optional[UserObjects] = None) -> JobParts:
    """Every part of the training job ``job`` for this rank (inside its process group)."""
    user = user or UserObjects()
    seed_everything(job.run.seed)
    train_ds, eval_ds, info = datasets_on_every_rank(
        lambda: sources.make_datasets(job.data, user.train_data, user.eval_data, user.collate_fn), cluster.world_size)
    task = sources.make_task(job.task.name, user.task, info)
    sources.check_loss_average(job.train.loss_average, task.sums_targets, task.name)
    sources.check_best_metric(job.checkpoint.best_metric, task)
    # The loader first (its sampler has its own generator: the model's init draws are unchanged), so
    # that the model's FLOPs can be counted on a real micro-batch before the strategy wraps it.
    loader, sampler = build_train_loader(train_ds, job.data, rank=cluster.rank, world_size=cluster.world_size,
                                         seed=job.run.seed, device=device)
    counted: list = []
    tokens = [info.seq_len or 0]

    def count_flops(module: nn.Module) -> None:
        indices = next(iter(sampler))  # (samples counted from the sampler: a batch may hold no target)
        batch = without_indices(train_ds.__getitems__(indices)) if hasattr(train_ds, "__getitems__") else None
        if batch is not None:
            counted.append(StepFlops.build(module, batch, task, job.train, device, cluster.world_size,
                                           verbose=cluster.is_rank0, samples=len(indices)))
            if isinstance(task, LanguageModel) and not tokens[0]:  # (fit's data: no seq_len given)
                try:
                    inputs = split_batch(batch)[0]
                except (KeyError, TypeError):
                    inputs = None  # (the task's loss will say what is wrong with the batch)
                if isinstance(inputs, torch.Tensor) and inputs.dim() == 2:
                    tokens[0] = int(inputs.shape[1])

    strategy = build_training(job, cluster, device, info, user.model, before_setup=count_flops, user=user)
    # run.seed_per_rank: every rank built the same model from the same seed; from here each draws its
    # own stream (dropout masks, random transforms in this process), as the samples of one larger
    # batch would. Rank 0 draws on as before (a one-process run is unchanged). Off by default: a
    # model whose forward takes random branches (layer drop) must take them alike on every rank.
    if cluster.rank and job.run.seed_per_rank:
        seed_everything(rank_seed(job.run.seed, cluster.rank))
    eval_loader = None  # no held-out data: no evaluation
    if eval_ds is not None:
        eval_loader = build_eval_loader(eval_ds, job.data, rank=cluster.rank, world_size=cluster.world_size,
                                        device=device)
        shield_workers(eval_loader)
    shield_workers(loader)  # SIGTERM/SIGUSR1 reach workers too: only the training process acts on them
    return JobParts(strategy, task, info, loader, sampler, eval_loader, counted[0] if counted else None, tokens[0])
