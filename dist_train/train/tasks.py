"""Tasks: what a batch means, the loss, and the evaluation metrics, so the loop stays task-agnostic.

A batch is whatever the DataLoader collated from the dataset's items: ``(input, target, ...)``
tuples, or dicts with an input and a target key. The input may be a tensor (``model(x)``), a tuple
(``model(*x)``) or a dict (``model(**x)``); the model may return a tensor, a tuple (its first
element is the prediction) or a dict (``"logits"``, else ``"output"``, else its first value).

Built in: ``classification`` (cross-entropy; accuracy and top-5 accuracy), ``language_model``
(next-token cross-entropy; accuracy, perplexity, and bits per byte when a token is a byte) and
``regression`` (mean squared error; mean absolute error). A plain loop's criterion is applied as
``criterion(model(x), y)`` (``is_criterion``: a loss module, a ``torch.nn.functional`` loss, or a
function whose first parameter names a prediction, ``def loss(logits, target)``). Anything else is
a callable ``task(model, batch) -> loss`` or ``-> (loss, {name: value})``: its metrics are averaged over
micro-batches and ranks during training, and over batches and ranks in evaluation. It gets the
batch as the dataset's items collated (``x, y = batch`` for ``(x, y)`` items; see
``without_indices``), on this rank's device; it is also called once on meta tensors (shapes, no
values) to count the FLOPs of a step: a task that needs values there only loses the FLOP count.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.data.registry import is_namedtuple, sample_indices

IGNORE_INDEX = -100  # F.cross_entropy's default: a target token (or label) that counts nowhere (padding)

INPUT_KEYS = ("input", "inputs", "x", "image", "images", "features")
TARGET_KEYS = ("target", "targets", "label", "labels", "y")
BUILTIN = ("classification", "language_model", "regression")


def without_indices(batch: Any) -> Any:
    """A batch from dist_train's loaders as the dataset's items collated: without the sample indices.

    The loaders append each sample's dataset index to a tuple or list batch, as its last element
    (an int64 tensor; ``debug.record_sample_ids`` and the resume tests read it): a dataset of
    ``(x, y)`` items gives ``(x, y, index)``. The loop, the evaluation and the FLOP count take it
    off before a task sees the batch, so that a task of one's own may unpack ``x, y = batch``.
    (Lists too: in older torch releases the DataLoader's ``pin_memory`` turned a tuple batch into a
    list.) Dict, namedtuple and tensor batches carry no index and pass as they are.
    """
    if not isinstance(batch, (tuple, list)) or not batch or is_namedtuple(batch):
        return batch
    if sample_indices(batch) is None:
        raise TypeError(f"a loader's tuple batch ends with its sample indices; got {type(batch[-1]).__name__}")
    return batch[:-1]


def batches_without_indices(batches: Iterator) -> Iterator:
    """``without_indices`` of each of the training loop's micro-batches (after the sample-id
    recorder has read the indices); closing it closes ``batches``."""
    try:
        for batch in batches:
            yield without_indices(batch)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def split_batch(batch: Any) -> Tuple[Any, Any]:
    """``(input, target)`` of a collated batch (a tuple/list, or a dict with known keys)."""
    if isinstance(batch, dict):
        target_key = next((k for k in TARGET_KEYS if k in batch), None)
        input_key = next((k for k in INPUT_KEYS if k in batch), None)
        if target_key is None:
            raise KeyError(f"a dict batch needs a target under one of {TARGET_KEYS}; it has {sorted(batch)}")
        if input_key is not None:
            return batch[input_key], batch[target_key]
        return {k: v for k, v in batch.items() if k != target_key}, batch[target_key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"a batch must be (input, target, ...) or a dict with a target key; got {type(batch).__name__}")


def call_model(model, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def prediction(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output (a tensor, a tuple or a dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        for key in ("logits", "output", "prediction"):
            if key in output:
                return output[key]
        return next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find the prediction in a model output of type {type(output).__name__}")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):  # (a dataset's own mapping type becomes a dict)
        return {k: to_device(v, device) for k, v in batch.items()}
    if is_namedtuple(batch):  # (built from its fields, not from one iterable)
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """Samples in a batch (0 for the empty batch a short evaluation shard ends with): its target's
    length, or for a batch without a target (a task of one's own: a dict of model inputs) the
    length of its first tensor of one dimension or more (1 when it holds none)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 0:
        return 0
    try:
        _, target = split_batch(batch)
    except (KeyError, TypeError):
        return _first_length(batch)
    return int(target.shape[0]) if isinstance(target, torch.Tensor) and target.dim() else 1


def _first_length(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        if isinstance(item, (torch.Tensor, tuple, list, dict)):
            return _first_length(item)
    return 1


class Task:
    """Training loss and evaluation sums of one kind of problem."""

    def eval_metric_names(self) -> Optional[Tuple[str, ...]]:
        """The metrics ``eval_metrics`` reports, when known before any evaluation (None: not
        known; a subclass may report others)."""
        return None

    name = "task"
    sums_targets = False  # loss_sum and target_count exist (train.loss_average=tokens)

    def loss(self, model, batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The mean loss of ``batch`` (and extra training metrics, usually none)."""
        inputs, target = split_batch(batch)
        return self.criterion(prediction(call_model(model, inputs)), target), {}

    def loss_sum(self, model, batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of ``batch`` summed over its counted targets (``loss`` is this over
        ``target_count``), and extra training metrics."""
        inputs, target = split_batch(batch)
        return self.criterion_sum(prediction(call_model(model, inputs)), target), {}

    def criterion_sum(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"task {self.name!r} has no summed loss")

    def target_count(self, batch) -> torch.Tensor:
        """How many targets of ``batch`` the loss averages over (a tensor on the batch's device),
        known before the forward."""
        raise NotImplementedError(f"task {self.name!r} does not count its targets")

    def criterion(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, model, batch) -> torch.Tensor:
        """A float64 vector of sums over the batch; summed over batches and ranks, then ``eval_metrics``."""
        raise NotImplementedError

    def eval_metrics(self, sums: torch.Tensor) -> Dict[str, float]:
        raise NotImplementedError


def _class_indices(target: torch.Tensor) -> torch.Tensor:
    """Class-index targets as int64, which cross_entropy requires: labels kept as uint8 or int32
    (a NumPy array's, a TensorDataset's) failed with "expected scalar type Long"."""
    return target if target.is_floating_point() or target.dtype == torch.int64 else target.long()


class Classification(Task):
    name = "classification"
    sums_targets = True

    def criterion(self, pred, target):
        target = _class_indices(target)
        if pred.dim() == 3:  # [B, T, C] token classification (class probabilities: [B, T, C] too)
            pred, target = pred.flatten(0, 1), target.flatten(0, 1) if target.is_floating_point() else target.flatten()
        if target.is_floating_point():  # (class probabilities: nothing is ignored)
            return F.cross_entropy(pred.float(), target)
        # cross_entropy's mean, but 0 (with zero gradients) for a micro-batch whose every target
        # is padding, where the mean is 0/0 = NaN: with gradient accumulation a short sequence's
        # padding can fill a whole micro-batch, and the NaN dropped the step on every rank.
        # (Bitwise the mean otherwise, the loss and its gradient; no host sync.)
        total = F.cross_entropy(pred.float(), target, reduction="sum", ignore_index=IGNORE_INDEX)
        return total / (target != IGNORE_INDEX).sum().clamp(min=1)

    def criterion_sum(self, pred, target):
        target = _class_indices(target)
        if pred.dim() == 3:
            pred, target = pred.flatten(0, 1), target.flatten()
        return F.cross_entropy(pred.float(), target, reduction="sum", ignore_index=IGNORE_INDEX)

    def target_count(self, batch):
        _, target = split_batch(batch)
        if target.is_floating_point():  # (class probabilities: one count per sample, not per class)
            raise ValueError("train.loss_average=tokens counts class-index targets; this batch has float targets "
                             "(class probabilities): use train.loss_average=micro_batch")
        return (target != IGNORE_INDEX).sum()

    def eval_sums(self, model, batch):
        inputs, target = split_batch(batch)
        pred, target = prediction(call_model(model, inputs)).float(), _class_indices(target)
        if pred.dim() == 3:
            pred, target = pred.flatten(0, 1), target.flatten()
        # Targets equal to cross_entropy's ignore_index (-100: padding) count nowhere, as in the
        # training loss's mean.
        loss = F.cross_entropy(pred, target, reduction="sum", ignore_index=IGNORE_INDEX)
        top = pred.topk(min(5, pred.shape[-1]), dim=-1).indices
        correct = (top[:, 0] == target).sum()  # (an ignored target matches no class index)
        top5 = (top == target.unsqueeze(-1)).any(dim=-1).sum()
        count = (target != IGNORE_INDEX).sum()
        return torch.stack([loss.double(), correct.double(), top5.double(), count.double()])

    def eval_metrics(self, sums):
        loss, correct, top5, count = (float(v) for v in sums)
        count = max(count, 1.0)
        return {"eval_loss": loss / count, "eval_accuracy": correct / count, "eval_top5_accuracy": top5 / count}

    def eval_metric_names(self):
        return ("eval_loss", "eval_accuracy", "eval_top5_accuracy") if type(self) is Classification else None


class LanguageModel(Classification):
    """Next-token prediction: ``target`` is the input shifted by one token (the dataset does it)."""

    name = "language_model"

    def __init__(self, bytes_per_token: Optional[float] = None):
        self.bytes_per_token = bytes_per_token

    def eval_metrics(self, sums):
        loss, correct, _top5, count = (float(v) for v in sums)
        count = max(count, 1.0)
        out = {"eval_loss": loss / count, "eval_accuracy": correct / count,
               "eval_perplexity": math.exp(min(loss / count, 700.0))}
        if self.bytes_per_token:
            out["eval_bpb"] = out["eval_loss"] / math.log(2) / self.bytes_per_token
        return out

    def eval_metric_names(self):
        if type(self) is not LanguageModel:
            return None
        return ("eval_loss", "eval_accuracy", "eval_perplexity") + (("eval_bpb",) if self.bytes_per_token else ())


class Regression(Task):
    name = "regression"
    sums_targets = True

    @staticmethod
    def _align(pred, target):
        """Prediction and target of one shape: the same number of values in another shape (``[B, 1]``
        against ``[B]``) are compared element by element, where broadcasting would compare every
        pair (``[B, B]``)."""
        target = target.to(pred.dtype) if target.is_floating_point() else target.float()
        if pred.shape != target.shape and pred.numel() == target.numel():
            pred = pred.reshape(target.shape)  # ([B] against [B, 1], a squeezed batch of one: () against [1, 1])
        elif pred.shape != target.shape:
            # (the same on every rank, whatever its batch: never one rank alone in the middle of an evaluation)
            raise ValueError(f"regression: the model's prediction has shape {tuple(pred.shape)} and the target "
                             f"{tuple(target.shape)}: different numbers of values")
        return pred.float(), target.float()

    def criterion(self, pred, target):
        pred, target = self._align(pred, target)
        return F.mse_loss(pred, target)

    def criterion_sum(self, pred, target):
        pred, target = self._align(pred, target)
        return F.mse_loss(pred, target, reduction="sum")

    def target_count(self, batch):
        _, target = split_batch(batch)
        # (torch.full: a fill kernel; torch.tensor of a number on a GPU copies it and waits for the device)
        return torch.full((), target.numel(), dtype=torch.int64, device=target.device)

    def eval_sums(self, model, batch):
        inputs, target = split_batch(batch)
        pred, target = self._align(prediction(call_model(model, inputs)), target)
        diff = (pred - target).double()
        return torch.stack([diff.square().sum(), diff.abs().sum(),
                            torch.tensor(float(diff.numel()), dtype=torch.float64, device=diff.device)])

    def eval_metrics(self, sums):
        sq, ab, count = (float(v) for v in sums)
        count = max(count, 1.0)
        return {"eval_loss": sq / count, "eval_mae": ab / count}

    def eval_metric_names(self):
        return ("eval_loss", "eval_mae") if type(self) is Regression else None


def _add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (Python 3.11; on 3.10 the note is kept where 3.11 keeps it)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


class CallableTask(Task):
    """A user's ``fn(model, batch) -> loss | (loss, {name: value})``."""

    def __init__(self, fn: Callable, name: str = ""):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")
        self.metric_names: Optional[List[str]] = None
        self._checked = False  # (a first call that raised gets a note on how the task is called)

    def loss(self, model, batch):
        if self._checked:
            out = self.fn(model, batch)
        else:
            try:
                out = self.fn(model, batch)
            except Exception as exc:
                _add_note(exc, f"dist_train: the task {self.name!r} is called as task(model, batch); a loss of "
                               "(prediction, target) is taken as such when it is a loss module or its first "
                               f"parameter is one of {', '.join(sorted(PREDICTION_NAMES))}")
                raise
            self._checked = True
        loss, metrics = (out if isinstance(out, tuple) else (out, {}))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"task {self.name!r} must return a scalar loss tensor (or (loss, metrics)); "
                            f"got {type(loss).__name__}")
        return loss, {k: torch.as_tensor(v, dtype=torch.float32, device=loss.device).detach()
                      for k, v in dict(metrics).items()}

    def eval_sums(self, model, batch):
        """The loss and metrics, taken as means over the batch's samples, weighted by that count:
        the evaluation is a mean over samples whatever the batch size, the world size and a short
        last batch (each batch counted once made them change it)."""
        loss, metrics = self.loss(model, batch)
        if self.metric_names is None:
            self.metric_names = sorted(metrics)
        n = float(batch_size(batch))
        values = [loss.detach().double() * n] + [metrics[k].double() * n for k in self.metric_names]
        return torch.stack(values + [torch.full((), n, dtype=torch.float64, device=loss.device)])

    def eval_metrics(self, sums):
        count = max(float(sums[-1]), 1.0)
        out = {"eval_loss": float(sums[0]) / count}
        for i, key in enumerate(self.metric_names or []):
            out[f"eval_{key}"] = float(sums[i + 1]) / count
        return out


class CriterionTask(CallableTask):
    """A plain PyTorch criterion as the task: a loss module (``nn.CrossEntropyLoss()``,
    ``nn.MSELoss()``, a user's ``FocalLoss(nn.Module)``), a ``torch.nn.functional`` loss
    (``F.cross_entropy``) or a user's ``loss(logits, target)`` (see ``is_criterion``), applied as a plain loop does: ``criterion(model(input), target)``, the
    model's prediction (the first of a tuple, a dict's ``logits``) against the batch's target.
    Evaluation reports its mean over the samples (``eval_loss``). Passed as ``task(model, batch)``,
    such a criterion got the model as its prediction and failed inside the first step."""

    def __init__(self, criterion: Callable):
        name = type(criterion).__name__ if isinstance(criterion, nn.Module) else getattr(criterion, "__name__", "")
        super().__init__(self._apply, name or "criterion")
        self._checked = True  # (called as a criterion: the note on task(model, batch) would mislead)
        self.users = criterion
        self._device: Optional[torch.device] = None  # where a loss module's buffers are

    def eval_metric_names(self):
        return ("eval_loss",) if type(self) is CriterionTask else None

    def _apply(self, model, batch):
        return Task.loss(self, model, batch)[0]  # (the built-in tasks' way: criterion(prediction, target))

    def criterion(self, pred, target):
        if isinstance(self.users, nn.Module) and pred.device != self._device:
            self.users.to(pred.device)  # (once: a class weight, a pos_weight are buffers made on the host)
            self._device = pred.device
        return self.users(pred, target)


# The first parameter's name of a user's own loss function, ``loss(logits, target)``: a prediction,
# where a task's first parameter is the model.
PREDICTION_NAMES = frozenset({"input", "inputs", "pred", "preds", "prediction", "predictions", "logits",
                              "output", "outputs", "out", "y_pred", "y_hat", "yhat", "scores"})


def _first_parameter(fn: Callable) -> Optional[str]:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    return params[0].name if params else None


def is_criterion(spec: Any) -> bool:
    """``(prediction, target) -> loss`` rather than ``task(model, batch)``: a loss module (any
    ``nn.Module`` given as the task whose ``forward``'s first parameter is not named ``model``: the
    ``FocalLoss(nn.Module)`` of a plain loop as much as ``nn.CrossEntropyLoss()``), a
    ``torch.nn.functional`` loss, or a function whose first parameter names a prediction
    (``def loss(logits, target)``; see ``PREDICTION_NAMES``)."""
    if isinstance(spec, Task) or not callable(spec):
        return False
    if isinstance(spec, nn.modules.loss._Loss):
        return True
    if isinstance(spec, nn.Module):
        return _first_parameter(spec.forward) != "model"
    if getattr(spec, "__module__", None) == F.__name__:
        return True
    return _first_parameter(spec) in PREDICTION_NAMES


_TASKS: Dict[str, Callable[..., Task]] = {"classification": Classification, "language_model": LanguageModel,
                                          "regression": Regression}


def register_task(name: str) -> Callable:
    """Decorator: ``@register_task("contrastive") def task(model, batch): ...`` makes
    ``task.name=contrastive`` (and ``fit(..., task="contrastive")``) use it."""
    def decorator(fn: Callable) -> Callable:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = lambda **_: CallableTask(fn, name)
        return fn

    return decorator


def task_names() -> List[str]:
    return sorted(_TASKS)


def make_task(spec: Any, **options: Any) -> Task:
    """A Task from a Task instance, a registered name, or a callable."""
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, str):
        if spec not in _TASKS:
            raise KeyError(f"unknown task {spec!r}; registered: {', '.join(task_names())}")
        factory = _TASKS[spec]
        return factory(**options) if spec == "language_model" else factory()
    if is_criterion(spec):
        return CriterionTask(spec)
    if callable(spec):
        return CallableTask(spec)
    raise TypeError(f"a task is a name or a callable; got {type(spec).__name__}")
