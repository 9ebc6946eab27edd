"""Checks that need the registries or the machine, run before any process group starts.

Each failure is a ConfigError naming the key, so every rank exits 2 with the same message
instead of failing deep inside a library (or hanging its peers). Strategy-specific checks belong
to each strategy (``Strategy.check_config``); this module only asks the registry for the class.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from typing import List, Optional, Tuple

import torch

from dist_train.config.schema import OPTIMIZERS, SCHEDULES, ConfigError
from dist_train.env.cluster import ClusterEnv, device_for

log = logging.getLogger("dist_train")


def _keys(mapping) -> str:
    return ", ".join(sorted(map(str, mapping)))


def _builtin_parameter_names(job) -> Optional[List[Tuple[str, torch.nn.Parameter]]]:
    """A built-in model's named parameters, built on the meta device for a stand-in dataset: their
    names do not depend on the dataset's shapes (only their sizes do). None: it cannot be built so
    (the run checks the patterns when it builds the model)."""
    from dist_train.data.registry import DataInfo
    from dist_train.models.registry import build_model

    for info in (DataInfo("classification", (3, 32, 32), 10), DataInfo("language_model", (16,), 256, 16)):
        try:
            with torch.device("meta"):
                return list(build_model(job.model, info).named_parameters())
        except Exception:  # noqa: BLE001  (a model of the other task, or one that needs the real data)
            continue
    return None


def _check_freeze(job, user) -> None:
    """``model.freeze`` and ``train.lr_scale`` patterns against the model's parameter names, where
    they are known without building the data: fit's module instance, a built-in model or a
    torchvision zoo model (built on the meta device: their names do not depend on the dataset).
    Other models are checked when they are built."""
    if not job.model.freeze and not job.train.lr_scale:
        return
    from dist_train.train.optim import unmatched_pattern

    from dist_train.models.registry import is_builtin_model

    model = user.model if user is not None else None
    if isinstance(model, torch.nn.Module):
        named = list(model.named_parameters())
    elif model is None and is_builtin_model(job.model.name):
        named = _builtin_parameter_names(job)
        if named is None:
            return
    elif model is None and job.model.name.startswith("torchvision:"):
        from dist_train import plugins

        try:
            with torch.device("meta"):
                named = list(plugins.torchvision_model(job.model.name, dict(job.model.args), None).named_parameters())
        except Exception:  # noqa: BLE001  (some zoo models cannot be built on the meta device, e.g. RegNet's
            return  # .tolist(): the run builds it for real and checks the names then)
    else:
        return
    names = [n for n, _ in named]
    problem = unmatched_pattern(names, job.model.freeze)
    if problem:
        raise ConfigError("model.freeze", problem)
    # (what the optimizer gets: not frozen by model.freeze, nor by hand, requires_grad=False on fit's module)
    trainable = [n for n, p in named if p.requires_grad and not any(fnmatch.fnmatchcase(n, f) for f in job.model.freeze)]
    problem = unmatched_pattern(trainable, job.train.lr_scale, "trainable parameter")
    if problem:
        raise ConfigError("train.lr_scale", problem)


def preflight(job, cluster: ClusterEnv, user=None, machine: bool = True) -> None:
    """``user``: fit's objects (train.build.UserObjects); the config names they replace are not checked.
    ``machine=False`` leaves out the file-system checks (the doctor reports those in its table)."""
    from dist_train import plugins
    from dist_train.data import dataset_names
    from dist_train.data.registry import dataset_task, is_builtin_dataset
    from dist_train.models.registry import check_model_compatible, is_builtin_model, model_names
    from dist_train.strategy import StepPlan, resolve_name, strategy_class, strategy_names
    from dist_train.train.tasks import task_names

    own_data = user is not None and user.train_data is not None
    own_model = user is not None and user.model is not None
    for key, given in (("optimizer", user is not None and user.optimizer is not None),
                       ("schedule", user is not None and user.scheduler is not None)):
        value = str(getattr(job.train, key))
        if value.startswith("fit:") and not given:  # (a fit run's config.yaml run again by the CLI)
            raise ConfigError(f"train.{key}", f"{value} names the {key.replace('schedule', 'scheduler')} a "
                              f"dist_train.fit call passed as an object; without it, give one of "
                              f"{', '.join(OPTIMIZERS if key == 'optimizer' else SCHEDULES)}")
    if job.checkpoint.best_metric and own_data and user.eval_data is None:
        raise ConfigError("checkpoint.best_metric", "needs held-out data to evaluate: pass eval_data to fit")
    if job.train.scheduler_interval == "epoch" and job.train.schedule in ("cosine", "linear"):
        raise ConfigError("train.scheduler_interval", f"epoch: train.schedule={job.train.schedule} spans "
                          "train.max_steps, optimizer steps, not epochs; with an epoch interval use step, multistep, "
                          "exponential or constant (train.step_size, train.milestones in epochs), or "
                          "fit(scheduler=...) of your own")
    if not own_data:
        plugins.check_name("data.name", job.data.name, dataset_names())
    if not own_model:
        plugins.check_name("model.name", job.model.name, model_names())
    # Keys the built-ins never read would be silently ignored: a typo'd way of configuring them.
    if not own_model and job.model.args and is_builtin_model(job.model.name):
        raise ConfigError("model.args", f"the built-in model {job.model.name!r} takes no model.args (they are for "
                          "a registered, torchvision or import-path model); it reads model.hidden, model.dropout, "
                          f"model.gpt.*; got {_keys(job.model.args)}")
    if not own_data and is_builtin_dataset(job.data.name):
        if job.data.args:
            raise ConfigError("data.args", f"the built-in dataset {job.data.name!r} takes no data.args (they are for "
                              f"a registered or import-path dataset); it reads the data.* keys; got {_keys(job.data.args)}")
        if job.data.root and job.data.name != "fashion_mnist":
            raise ConfigError("data.root", f"the built-in dataset {job.data.name!r} reads no folder (data.root is "
                              "for fashion_mnist and datasets of your own); leave data.root empty")
    if not (own_data or own_model) and job.model.name in model_names() and job.data.name in dataset_names():
        try:
            check_model_compatible(job.model.name, dataset_task(job.data.name))
        except ValueError as exc:
            raise ConfigError("model.name", str(exc)) from None
    if not own_data and job.data.name in dataset_names():
        from dist_train.data.registry import dataset_has_pixels
        from dist_train.data.transforms import pixels_problem, preprocessing_problem

        problem = preprocessing_problem(job.data, dataset_task(job.data.name))
        if problem is None and dataset_has_pixels(job.data.name) is not None:
            problem = pixels_problem(job.data, dataset_has_pixels(job.data.name))
        if problem:
            raise ConfigError(*problem)
    else:  # fit's dataset, or an import path's: its samples are what it returns
        from dist_train.data.transforms import preprocessing_asked

        key = preprocessing_asked(job.data)
        if key:
            raise ConfigError(key, "applies to the built-in image datasets only; a dataset of your own ("
                              + ("fit's train_data" if own_data else f"data.name={job.data.name!r}")
                              + ") is used as it is: apply your transforms in its "
                              "__getitem__ (torchvision.transforms work there, and resume exactly)")
    if job.task.name and not (user is not None and user.task is not None):
        plugins.check_name("task.name", job.task.name, task_names())
        builtin_tasks = ("classification", "language_model", "regression")
        if (not own_data and job.data.name in dataset_names() and job.task.name in builtin_tasks
                and job.task.name != dataset_task(job.data.name)):
            raise ConfigError("task.name", f"{job.task.name} does not fit data.name={job.data.name!r}, a "
                                           f"{dataset_task(job.data.name)} dataset (leave task.name empty: the "
                                           "dataset's own task is used)")
    _check_task(job, user)
    _check_user_model(user)
    _check_freeze(job, user)
    if job.model.init_from and not os.path.exists(job.model.init_from):
        raise ConfigError("model.init_from", f"no such file or directory: {job.model.init_from}")

    name = resolve_name(job.strategy.name, cluster.world_size)
    if name not in strategy_names():
        raise ConfigError("strategy.name", f"must be auto or a registered strategy: {', '.join(strategy_names())}; "
                          f"got {name!r}")
    cuda = torch.cuda.is_available()
    if job.dist.backend == "nccl" and not cuda:
        raise ConfigError("dist.backend", "nccl needs CUDA GPUs, and this machine has none; use auto or gloo")
    if job.dist.backend == "gloo" and cuda and name in ("fsdp", "deepspeed"):
        raise ConfigError("dist.backend", f"gloo on GPUs runs strategy.name=single or ddp; {name} needs collectives "
                          "that gloo does not run on GPU tensors (reduce-scatter): use auto or nccl")
    if job.train.precision == "fp16" and not cuda:
        raise ConfigError("train.precision", "fp16 needs a CUDA GPU (no GPU here); use bf16 or fp32 on the CPU")
    if job.train.precision == "bf16" and cuda:
        # The capability, not torch.cuda.is_bf16_supported(): before Ampere that one makes a tensor on
        # the current device, i.e. a CUDA context on GPU 0 in every rank (and in the launcher) for
        # the whole run, before the process group sets each rank's own device.
        major, minor = torch.cuda.get_device_capability(device_for(cluster))
        if major < 8 and cluster.is_rank0:
            log.warning("train.precision=bf16 on a GPU of compute capability %d.%d (before Ampere): torch emulates "
                        "bf16 there, slowly; fp16 is this GPU's native half precision", major, minor)
    plan = StepPlan(job.data.batch_size, job.train.grad_accum_steps, job.train.grad_clip)
    strategy_class(name).check_config(job.strategy, plan, job.train.precision, cluster.world_size)
    train_samples = None  # (when known without reading the data)
    if own_data and not callable(user.train_data) and hasattr(user.train_data, "__len__"):
        try:
            train_samples = len(user.train_data)
        except Exception:  # noqa: BLE001  (an odd or lazy dataset: the run's loader says what is wrong with it)
            train_samples = None
    elif not own_data and job.data.name in dataset_names():
        from dist_train.data.registry import dataset_train_size

        train_samples = dataset_train_size(job.data)
    if train_samples:  # (fit's empty dataset: refused by name when its loader is built)
        from dist_train.data.loader import batch_too_large

        problem = batch_too_large(job.data.batch_size, cluster.world_size, train_samples)
        if problem:
            raise ConfigError("data.batch_size", problem)
        if job.train.epochs:  # (the loader drops each epoch's last incomplete global batch)
            from dist_train.train.optim import steps_for_epochs

            steps_for_epochs(job.train.epochs, train_samples // (job.data.batch_size * cluster.world_size),
                             job.train.grad_accum_steps)
    if job.checkpoint.resume not in ("auto", "never") and not os.path.exists(job.checkpoint.resume):
        raise ConfigError("checkpoint.resume", f"no checkpoint at {job.checkpoint.resume!r} (auto, never or a path)")
    if machine:
        from dist_train.preflight_io import check_io

        check_io(job, cluster)  # run dir writable, data.root present, resume path a checkpoint, sane worker count


def _check_task(job, user) -> None:
    """fit's ``task`` (a name, a callable or a Task) or ``task.name``, resolved as the run will; and
    ``train.loss_average=tokens`` against it (a task of one's own cannot sum its loss). The
    dataset's own task (no name given) is checked once the data is built."""
    from dist_train import plugins
    from dist_train.train import sources

    given = user is not None and user.task is not None
    if not given and not job.task.name:
        return
    task = sources.make_task(job.task.name, user.task if given else None, plugins.DatasetInfo())
    sources.check_loss_average(job.train.loss_average, task.sums_targets, task.name)
    sources.check_best_metric(job.checkpoint.best_metric, task)


def _check_user_model(user) -> None:
    """fit's ``model``: a module, or a builder (a class or a function) that returns one when called."""
    model = user.model if user is not None else None
    if model is not None and not isinstance(model, torch.nn.Module) and not callable(model):
        raise ConfigError("model", f"must be a torch.nn.Module or a zero-argument callable returning one; got "
                                   f"{type(model).__name__}")
