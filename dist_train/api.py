"""``dist_train.fit``: a user's own model, data and loss, trained by dist_train.

    import dist_train
    summary = dist_train.fit(model, train_data, eval_data=None, task=None, config=None, overrides=())

Launched exactly like the CLI (``python my_train.py``, ``torchrun --nproc_per_node=N my_train.py``,
``srun``), with the same strategies, checkpoints, resume, preemption, MLflow and run directory.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from dist_train.config import ConfigError, load_config
from dist_train.env.cluster import detect
from dist_train.env.preemption import EXIT_PREEMPTED


class TrainingFailed(RuntimeError):
    """The run failed (its summary.json says why); ``.summary`` is this rank's summary."""

    def __init__(self, message: str, summary: Dict[str, Any]):
        super().__init__(message)
        self.summary = summary


def fit(model: Any, train_data: Any, eval_data: Any = None, task: Any = None,
        config: Union[str, Mapping, None] = None, overrides: Sequence[str] = (),
        collate_fn: Optional[Callable[[List[Any]], Any]] = None, optimizer: Any = None,
        scheduler: Any = None) -> Dict[str, Any]:
    """Train ``model`` on ``train_data``; return the summary (the ``summary.json`` dict) on every rank.

    ``model``: an ``nn.Module``, or a zero-argument callable returning one. Every rank starts from
    rank 0's weights, whatever each rank built. ``train_data`` / ``eval_data``: map-style Datasets
    (or zero-argument callables returning one) whose items are ``(input, target)`` tuples or dicts.
    ``task``: ``"classification"``, ``"language_model"``, ``"regression"``, a registered name, or a
    callable ``task(model, batch) -> loss`` or ``-> (loss, {name: value})``; default: classification.
    ``config``: a YAML path, a mapping of sections, or None (the built-in defaults); ``overrides``:
    ``key=value`` strings, as on the command line. ``collate_fn``: batches a list of items, as the
    DataLoader argument does (padding items of different lengths); its batch may be a tuple (its
    last element then gets the sample indices, taken off before the task sees it) or a dict.
    ``optimizer``: your own, in place of ``train.optimizer``: a ``torch.optim.Optimizer`` built
    over ``model.parameters()`` of the model passed here (rebuilt over the trained parameters, by
    name, under every strategy), an optimizer class or ``functools.partial`` of one (called with
    the trainable parameters), or a callable ``model -> optimizer``. ``scheduler``: a callable
    ``optimizer -> LRScheduler`` (``lambda opt: StepLR(opt, 30)``), stepped once per optimizer
    step (per epoch with ``train.scheduler_interval=epoch``), in place of ``train.schedule`` (which otherwise scales your optimizer's learning rates).
    Both are checkpointed and resumed like dist_train's own (``dist_train/train/own_optim.py``).

    Raises ConfigError (naming the key) for a bad config, before any process group starts, and
    for a builder or dataset that cannot be used; TrainingFailed when the run fails. A preempted
    run returns its summary with ``status == "preempted"`` (rerun the same script to resume).
    """
    from dist_train.preflight import preflight
    from dist_train.train.build import UserObjects
    from dist_train.train.job import run

    if train_data is None:
        raise ConfigError("train_data", "fit needs a training Dataset")
    if collate_fn is not None and not callable(collate_fn):
        raise ConfigError("collate_fn", f"must be a callable (a list of items -> a batch); got {type(collate_fn).__name__}")
    job = load_config(config, overrides)
    own_optimizer, own_scheduler = _own_optimizer(job, model, optimizer, scheduler)
    user = UserObjects(model=model, train_data=train_data, eval_data=eval_data, task=task, collate_fn=collate_fn,
                       optimizer=own_optimizer, scheduler=own_scheduler)
    if model is not None:  # config.yaml, summary.json and checkpoints name what really trains
        job.model.name = f"fit:{_name(model)}"
    job.data.name = f"fit:{_name(train_data)}"
    cluster = detect()
    try:
        preflight(job, cluster, user)
    except ConfigError as exc:
        from dist_train.train.job import record_refused

        record_refused(job, cluster, exc)  # (a run dir's summary.json never tells of an older attempt)
        raise
    outcome = run(job, cluster, user)
    if outcome.code == 0 or outcome.code == EXIT_PREEMPTED:
        return outcome.summary
    if outcome.code == 2 and isinstance(outcome.error, Exception):
        raise outcome.error
    raise TrainingFailed(f"training failed: {outcome.summary.get('error', 'see the log')}", outcome.summary)


def _own_optimizer(job, model: Any, optimizer: Any, scheduler: Any):
    """fit's own optimizer and scheduler, checked (ConfigError before any process group) and named
    in the job's config (``train.optimizer=fit:SGD``, ``train.schedule=fit:StepLR``)."""
    from dist_train.train.own_optim import OwnOptimizer, OwnScheduler, probe_scheduler

    own_optimizer = own_scheduler = None
    if optimizer is not None:
        if job.train.lr_scale:
            raise ConfigError("train.lr_scale", "scales dist_train's own optimizer's learning rates; your optimizer "
                                                "sets its own: give it param groups with their own lr instead")
        own_optimizer = OwnOptimizer(optimizer, model, job.train.precision)
        job.train.optimizer = f"fit:{own_optimizer.describe(model)}"
    if scheduler is not None:
        own_scheduler = OwnScheduler(scheduler, job.train.scheduler_interval)
        job.train.schedule = f"fit:{probe_scheduler(own_scheduler, own_optimizer, model)}"
    return own_optimizer, own_scheduler


def _name(obj: Any) -> str:
    if isinstance(obj, type) or callable(obj) and not hasattr(obj, "forward") and not hasattr(obj, "__getitem__"):
        return getattr(obj, "__name__", type(obj).__name__)
    return type(obj).__name__
