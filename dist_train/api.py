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
        collate_fn: Optional[Callable[[List[Any]], Any]] = None) -> Dict[str, Any]:
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
    user = UserObjects(model=model, train_data=train_data, eval_data=eval_data, task=task, collate_fn=collate_fn)
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


def _name(obj: Any) -> str:
    if isinstance(obj, type) or callable(obj) and not hasattr(obj, "forward") and not hasattr(obj, "__getitem__"):
        return getattr(obj, "__name__", type(obj).__name__)
    return type(obj).__name__
