"""Where a job's model, data and task come from: the built-ins, a user's registered or imported
builders (``plugins.py``), or the objects handed to ``dist_train.fit``. Also the two practices that
act on a built model before it is wrapped: ``model.init_from`` and ``model.freeze``.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from dist_train import plugins
from dist_train.config.schema import ConfigError
from dist_train.data.loader import seed_generators
from dist_train.data.registry import is_namedtuple
from dist_train.train import tasks
from dist_train.train.optim import unmatched_pattern

log = logging.getLogger("dist_train")


# --- data -----------------------------------------------------------------------------------------

class MapDataset(Dataset):
    """A user's map-style dataset, collated batch-wise for our batch sampler: a tuple (or list)
    item's batch gets the dataset indices appended (``(input, target, indices)``), as the
    built-ins' do; a namedtuple item's batch is that namedtuple, as collated.

    Its own random transforms (torchvision's, or draws from ``random`` / numpy's global
    generator) resume exactly in DataLoader workers too: a worker seeds torch's, ``random``'s and
    numpy's global generators before each training batch from that batch's first sample seed (a
    hash of run seed, epoch and index, from the sampler). Seeded once per worker, a resumed run's
    workers replayed their streams from the start of the run. In the training process itself
    (``data.num_workers=0``) the generators are left alone: they are checkpointed with the run.
    An evaluation batch in a worker is seeded from its first index alone, so that every evaluation
    draws the same transforms (comparable from step to step, and alike after a resume: a worker
    seeded once ran on from one evaluation to the next and started over at a resume). The seeds
    follow batches, not samples: with random transforms, another split of the batch over ranks
    draws other numbers (the built-in ``data.augment`` seeds each sample).
    """

    needs_sample_seeds = True  # (the training sampler hands (index, seed) pairs; evaluation plain indices)

    def __init__(self, dataset: Dataset, key: str, collate_fn: Optional[Callable[[List[Any]], Any]] = None):
        if isinstance(dataset, IterableDataset):
            raise ConfigError(key, "an IterableDataset cannot be used: dist_train shards one global sample order "
                              "across ranks and resumes mid-epoch from a position in it, and a stream has no such "
                              "order; wrap it in a map-style Dataset (with __len__ and __getitem__)")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError(key, f"a {type(dataset).__name__} is not a map-style Dataset (it needs __len__ and "
                              "__getitem__)")
        if len(dataset) == 0:
            raise ConfigError(key, "the dataset is empty")
        if collate_fn is not None and not callable(collate_fn):
            raise ConfigError("collate_fn", f"must be a callable (a list of items -> a batch); got {type(collate_fn).__name__}")
        self.dataset, self.collate_fn = dataset, collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, keys: Sequence[Any]) -> Any:
        if keys and isinstance(keys[0], tuple):
            if get_worker_info() is not None:
                seed_generators(int(keys[0][1]))
            indices = [int(k[0]) for k in keys]
        else:
            indices = [int(k) for k in keys]
            if indices and get_worker_info() is not None:
                seed_generators((indices[0] * 0x9E3779B97F4A7C15 + 0x5EED) % 2**63)
        items = [self.dataset[i] for i in indices]
        if not items:
            return items
        if self.collate_fn is not None:
            batch = self.collate_fn(items)
            if isinstance(batch, Mapping) and not isinstance(batch, dict):
                batch = dict(batch)  # (a UserDict, Hugging Face's BatchEncoding: a dict batch from here on)
        else:
            try:
                batch = default_collate(items)
            except RuntimeError as exc:
                if "equal size" not in str(exc):
                    raise
                raise RuntimeError(f"{exc}: the items of a batch have different shapes; pad them in the dataset, or "
                                   "give fit(..., collate_fn=...) (a data.name builder: its info's collate_fn) a "
                                   "function that pads a list of items into one batch") from None
        if isinstance(batch, (tuple, list)) and not is_namedtuple(batch):
            # (A namedtuple's or dict's batch stays as collated, without the indices: no room for them.)
            index = torch.as_tensor(list(indices), dtype=torch.int64)
            return [*batch, index] if isinstance(batch, list) else (*batch, index)
        return batch


def _dataset(obj: Any, key: str, collate_fn: Optional[Callable] = None) -> Optional[Dataset]:
    if obj is None:
        return None
    # A builder: a function, or a Dataset class (a class has __getitem__ too, as an attribute).
    if isinstance(obj, type) or (not isinstance(obj, Dataset) and callable(obj) and not hasattr(obj, "__getitem__")):
        obj = plugins.call_builder(obj, key)
    return MapDataset(obj, key, collate_fn)


def make_datasets(cfg, train_data: Any = None, eval_data: Any = None,
                  collate_fn: Optional[Callable] = None) -> Tuple[Dataset, Dataset, Any]:
    """``(train, eval or None, info)`` from fit's objects (batched by ``collate_fn``, if given), a
    built-in ``data.name``, or a user builder (whose info may name a ``collate_fn``)."""
    if train_data is not None:
        return (_dataset(train_data, "train_data", collate_fn), _dataset(eval_data, "eval_data", collate_fn),
                plugins.DatasetInfo())
    from dist_train.data import build_datasets, dataset_names

    if cfg.name in dataset_names():
        return build_datasets(cfg)
    builder = plugins.user_callable("data.name", cfg.name)
    if builder is None:
        raise ConfigError("data.name", f"unknown dataset {cfg.name!r}")
    out = plugins.call_builder(builder, "data.name", dict(cfg.args))
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise ConfigError("data.name", f"the builder {cfg.name} must return (train, eval) or (train, eval, info); "
                          f"got {type(out).__name__}")
    extra = out[2] if len(out) == 3 else {}
    if not isinstance(extra, dict):
        raise ConfigError("data.name", f"the builder's third value must be a dict (task, num_classes, ...); "
                          f"got {type(extra).__name__}")
    try:
        info = plugins.DatasetInfo(**extra)
    except TypeError as exc:
        raise ConfigError("data.name", f"the builder's info: {exc}") from None
    collate = info.collate_fn
    return (MapDataset(out[0], "data.name", collate),
            (MapDataset(out[1], "data.name", collate) if out[1] is not None else None), info)


# --- task -----------------------------------------------------------------------------------------

def check_loss_average(loss_average: str, sums_targets: bool, name: str) -> None:
    """``train.loss_average=tokens`` needs a task that sums its loss and counts its targets (the
    built-in ones); a task of one's own returns a mean whose weight is unknown."""
    if loss_average == "tokens" and not sums_targets:
        raise ConfigError("train.loss_average", f"tokens needs a built-in task ({', '.join(tasks.BUILTIN)}), which "
                          f"sums its loss and counts its targets; task {name!r} returns a mean of unknown "
                          "weight: use train.loss_average=micro_batch, or weigh the loss in the task")


def check_best_metric(metric: str, task: tasks.Task) -> None:
    """``checkpoint.best_metric`` against the metrics the task's evaluation reports, where they are
    known before it evaluates (the built-in tasks, a plain criterion); a task of one's own is
    checked at its first evaluation (``checkpoint/best.py``)."""
    known = task.eval_metric_names()
    if metric and known and metric not in known:
        raise ConfigError("checkpoint.best_metric", f"{metric!r} is not among the metrics task {task.name!r} "
                                                    f"evaluates: {', '.join(known)}")


def make_task(name: str, user_task: Any, info) -> tasks.Task:
    """fit's ``task`` argument, else ``task.name``, else the dataset's own task."""
    spec = user_task if user_task is not None else (name or info.task)
    key = "task" if user_task is not None else "task.name"
    if isinstance(spec, str) and spec not in tasks.task_names():
        fn = plugins.user_callable("task.name", spec)
        if fn is None:
            raise ConfigError(key, f"unknown task {spec!r}; built in: {', '.join(tasks.task_names())}, or an import "
                              "path package.module:function")
        spec = fn
    bytes_per_token = getattr(info, "bytes_per_token", None)
    if bytes_per_token is None and not isinstance(info, plugins.DatasetInfo) and info.task == "language_model":
        bytes_per_token = 1  # the built-in text datasets are byte-level
    try:
        return tasks.make_task(spec, bytes_per_token=bytes_per_token)
    except (KeyError, TypeError) as exc:
        raise ConfigError(key, str(exc)) from None


# --- model ----------------------------------------------------------------------------------------

def is_builtin_model(name: str) -> bool:
    from dist_train.models import model_names

    return name in model_names()


def make_model(cfg, info, user_model: Any = None) -> nn.Module:
    """fit's model (a module, or a zero-argument builder), or ``model.name``'s."""
    if user_model is not None:
        module = user_model if isinstance(user_model, nn.Module) else plugins.call_builder(user_model, "model")
        key = "model"
    elif is_builtin_model(cfg.name):
        from dist_train.models import build_model

        return build_model(cfg, info)
    elif cfg.name.startswith("torchvision:"):
        module, key = plugins.torchvision_model(cfg.name, dict(cfg.args), info), "model.name"
    else:
        builder = plugins.user_callable("model.name", cfg.name)
        if builder is None:
            raise ConfigError("model.name", f"unknown model {cfg.name!r}")
        module, key = plugins.call_builder(builder, "model.name", dict(cfg.args), info), "model.name"
    if not isinstance(module, nn.Module):
        raise ConfigError(key, f"the model must be a torch.nn.Module; got {type(module).__name__}")
    if cfg.init != "default":  # model.init on a module dist_train did not build: Linear and Conv layers
        from dist_train.models.init import apply_init

        apply_init(module, cfg.init)
    return module


def init_from(module: nn.Module, path: str, verbose: bool = True) -> Dict[str, List[str]]:
    """Load ``path``'s tensors into ``module`` by name. Missing keys, unexpected keys and keys whose
    shapes differ (a replaced head: the normal case of transfer learning) are reported, not fatal;
    a file that matches nothing is a ConfigError."""
    from dist_train.checkpoint.weights import load_weights

    try:
        source = load_weights(path)
    except ValueError as exc:
        raise ConfigError("model.init_from", str(exc)) from None
    own = module.state_dict()
    mismatched = sorted(k for k in source if k in own and tuple(source[k].shape) != tuple(own[k].shape))
    usable = {k: v for k, v in source.items() if k in own and k not in mismatched}
    if not usable:
        raise ConfigError("model.init_from", f"no tensor of {path} fits this model (its names: "
                          f"{', '.join(sorted(source)[:5])}; the model's: {', '.join(sorted(own)[:5])})")
    result = module.load_state_dict(usable, strict=False)
    report = {"loaded": sorted(usable), "missing": sorted(set(result.missing_keys) - set(mismatched)),
              "unexpected": sorted(k for k in source if k not in own), "shape_mismatch": mismatched}
    if verbose:
        log.info("model.init_from %s: loaded %d tensors; kept this model's own values for %d (missing in the file: "
                 "%s; shape differs: %s); ignored %d the model lacks (%s)", path, len(usable),
                 len(report["missing"]) + len(mismatched), _few(report["missing"]), _few(mismatched),
                 len(report["unexpected"]), _few(report["unexpected"]))
    return report


def freeze(module: nn.Module, patterns: List[str], verbose: bool = True) -> List[str]:
    """Set ``requires_grad=False`` on the parameters whose names match a glob of ``patterns``
    (the optimizer only ever sees trainable parameters). Returns the frozen names."""
    if not patterns:
        return []
    problem = unmatched_pattern([n for n, _ in module.named_parameters()], patterns)
    if problem:
        raise ConfigError("model.freeze", problem)
    frozen = []
    for name, p in module.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError("model.freeze", "freezes every parameter: nothing is left to train")
    if verbose:
        total = sum(p.numel() for p in module.parameters())
        log.info("model.freeze: %d parameter tensors frozen; %d of %d parameters train", len(frozen), trainable, total)
    return frozen


def _few(names: List[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "") if names else "none"
