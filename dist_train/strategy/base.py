"""The one small interface every parallel strategy implements.

The training loop calls four methods and never asks which strategy it runs:

    with strategy.accumulate(sync=is_last_micro_step), strategy.autocast():
        loss = task(strategy.model, batch)
        strategy.backward(loss / accum)       # DeepSpeed's engine owns backward, so it goes through here
    result = strategy.step(max_norm, apply)   # unscale, clip, optimizer + scheduler step, zero grad

The checkpoint layer calls three, and never asks either: a strategy owns how its state is saved
and loaded (``save_checkpoint`` / ``check_checkpoint`` / ``load_checkpoint``). It is handed a
``files`` object by the checkpoint layer (see ``dist_train.checkpoint.files.CheckpointFiles``):
``files.write_state(sd)`` / ``files.read_state(sd)`` write and read a torch.distributed.checkpoint
(DCP) state dict, ``files.read_model()`` gives full model weights, ``files.stored_shapes()`` their
shapes, ``files.native_dir`` is a folder for an engine's own files and ``files.stage(sd)`` copies a
state dict to host memory for a background write.

Preflight calls ``check_config`` (a classmethod) before any process group starts.
"""
from __future__ import annotations

import contextlib
import logging
import math
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterable, List, Optional, Set, Tuple, TypeVar

import torch
from torch import nn

from dist_train.env.cluster import ClusterEnv
from dist_train.env.collectives import all_reduce, broadcast_tensors

T = TypeVar("T")
log = logging.getLogger(__name__)


def _storage_ptr(t: torch.Tensor) -> int:
    """Where a tensor's (or a DTensor's local shard's) memory starts: equal for a parameter and
    the detached tensor a state dict holds of it."""
    return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()


# Called with the module after the strategy wrapped or sharded it (its parameter names unchanged:
# train.lr_scale matches them); an iterable of parameters is taken too.
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
Writer = Callable[[], None]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepPlan:
    """The shape of one optimizer step, for engines that must know it up front (DeepSpeed)."""

    micro_batch_size: int
    grad_accum_steps: int
    grad_clip: float


@dataclass
class StepResult:
    """What one optimizer step reports. ``grad_norm`` (the pre-clip global norm) stays a tensor
    (reading it would synchronise the host with the device every step): read it at logging steps.
    ``skipped``: the update was not applied (fp16 overflow, or vetoed by the loop)."""

    grad_norm: Any
    skipped: bool = False
    loss_scale: Any = None  # fp16: the scale after this step (a tensor: read at logging steps)
    grad_norms: Optional[Dict[str, float]] = None  # "grad_norm/<module>" of the largest few, when asked
    nonfinite: bool = False  # dropped for a non-finite loss or gradient (not an fp16 overflow)


class Precision:
    """Autocast and (for fp16) a gradient scaler: shared by the torch-native strategies."""

    def __init__(self, precision: str, device: torch.device):
        self.precision = precision
        self.device = device
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> ContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> Tuple[bool, Any]:
        """Step (or skip on inf/nan under fp16); returns (skipped, loss scale).

        Under fp16 the host reads one flag, before the update: whether ``unscale_`` (called by
        ``Strategy.step``) found an inf or NaN, which is what makes the scaler skip the step and
        lower its scale. The scale after ``update()`` is returned as a device tensor (read at
        logging steps): reading it as a number, as ``get_scale()`` does, would make the host wait
        for the update itself and leave the device idle while the loop fetches the next batch."""
        if self.scaler is None:
            optimizer.step()
            return False, None
        found = _found_inf(self.scaler, optimizer) if self.scaler.is_enabled() else None
        scale = _scale_tensor(self.scaler) if found is not None else None
        if found is None or scale is None:  # (a scaler that does not keep them where torch's does)
            scale_before = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            return self.scaler.get_scale() < scale_before, self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return found, scale.detach().clone()  # (update() changes that tensor in place: this step's value)

    def state_dict(self) -> Optional[dict]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def _found_inf(scaler: Any, optimizer: torch.optim.Optimizer) -> Optional[bool]:
    """Whether the scaler's ``unscale_`` of ``optimizer``'s gradients found an inf or NaN (the
    flags its ``step`` reads to decide; ShardedGradScaler's are all-reduced over the ranks), or
    None where they are not there (``unscale_`` not called)."""
    states = getattr(scaler, "_per_optimizer_states", None)
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    flags = state.get("found_inf_per_device") if isinstance(state, dict) else None
    if not flags:
        return None
    return bool(sum(float(flag.item()) for flag in flags.values()))


def _scale_tensor(scaler: Any) -> Optional[torch.Tensor]:
    """The scaler's current scale as the tensor it keeps (no host read), or None."""
    scale = getattr(scaler, "_scale", None)  # (what its _get_scale_async returns; unset until the first scale())
    return scale if isinstance(scale, torch.Tensor) else None


class Strategy(ABC):
    """Wraps model and optimizer; owns backward, the optimizer step, gradient sync and its state."""

    name: str = "base"
    #: Runs on a process group even with one process (then a 1-rank group).
    needs_process_group: bool = True
    #: Its state can be copied to host memory and written by a background thread.
    async_checkpoint: bool = True
    #: train.compile: setup() compiles the model in place; set by the job builder.
    compile: bool = False
    #: ``step`` sees the global gradient norm before the update (the same on every rank): a
    #: non-finite one can veto the update without another collective.
    global_grad_norm: bool = True

    @staticmethod
    def before_update() -> None:
        """Called first thing in ``step``, before anything changes a parameter or the optimizer
        state. The checkpoint manager of an async save replaces it on the instance with a wait
        for the save's copy of that state, made while this step's forward and backward ran."""

    def __init__(self, cfg, cluster: ClusterEnv, device: torch.device, precision: str,
                 plan: Optional[StepPlan] = None):
        self.cfg = cfg
        self.cluster = cluster
        self.device = device
        self.precision = Precision(precision, device)
        self.plan = plan
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LRScheduler
        # A user's own optimizer or scheduler (fit): its hyperparameters and schedule come back
        # from a checkpoint as they were, as torch's load_state_dict brings them back (a
        # OneCycleLR cycles Adam's betas: this run's starting values would undo that), instead of
        # this run's config's (keep_optimizer_settings).
        self.settings_from_checkpoint = False
        # train.scheduler_interval=epoch: the loop has the schedule stepped at the end of each epoch
        # (schedule_epochs), not step().
        self.scheduler_per_step = True

    # --- before anything starts ----------------------------------------------------------------

    @classmethod
    def check_config(cls, cfg, plan: StepPlan, precision: str, world_size: int) -> None:
        """Raise ``ConfigError(key, reason)`` for settings this strategy cannot run (``cfg`` is the
        ``strategy`` section). Called by preflight, before any process group starts."""

    # --- building ------------------------------------------------------------------------------

    def init_context(self) -> ContextManager:
        """Context the model is built in. FSDP with ``strategy.fsdp.meta_init`` builds on the meta
        device and materialises only the local shards in ``setup``; the others build normally."""
        return contextlib.nullcontext()

    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory) -> None:
        """Move/shard/wrap ``model`` and build optimizer and scheduler over the result."""

    # --- the loop ------------------------------------------------------------------------------

    def autocast(self) -> ContextManager:
        return self.precision.autocast()

    def accumulate(self, sync: bool) -> ContextManager:
        """Context for one micro-step; ``sync=False`` skips the gradient reduce."""
        return contextlib.nullcontext()

    def run_task(self, fn: Callable[[nn.Module], T]) -> T:
        """``fn(model)``: a task's loss (or evaluation) of one batch. A wrapper whose own forward
        does the distributed work (DDP, FSDP's root) runs ``fn`` inside that forward, with the
        module itself: a task may then call the model's submodules and methods, or use its
        parameters directly (a regulariser), and still get the wrapper's gradient reduction."""
        return fn(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.scale(loss).backward()

    def step(self, max_norm: float, apply: bool = True, grad_norms: int = 0, finite_grads: bool = False) -> StepResult:
        """Clip to ``max_norm`` (0: only measure), step optimizer and schedule, zero the gradients.
        ``apply=False`` (a veto the ranks agreed on) drops this step's gradients instead of
        applying them; the schedule still advances, so the LR stays a function of the step.
        ``grad_norms=K``: also report the K modules with the largest pre-clip gradient norms
        (a collective under sharding: every rank must ask alike). ``finite_grads``: also drop the
        update when the global gradient norm is not finite (every rank sees the same global norm;
        under fp16 the gradient scaler decides instead)."""
        self.before_update()
        self.precision.unscale(self.optimizer)
        per_module = self.module_grad_norms(grad_norms) if grad_norms else None
        norm = self._clip_grad_norm(max_norm)
        nonfinite = not apply
        # (one host read of the norm: a sync, and no isfinite kernel to launch before it)
        if apply and finite_grads and self.precision.scaler is None and not math.isfinite(norm.item()):
            apply, nonfinite = False, True
        skipped, scale = (True, None)
        if apply:
            skipped, scale = self.precision.optimizer_step(self.optimizer)
        elif self.precision.scaler is not None:
            self.precision.scaler.update()  # unscale_ was called: the scaler expects an update
        if self.scheduler_per_step:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(grad_norm=norm.detach(), skipped=skipped, loss_scale=scale, grad_norms=per_module,
                          nonfinite=nonfinite)

    def schedule_epochs(self, done: int) -> None:
        """``train.scheduler_interval=epoch`` (``scheduler_per_step`` False): step the schedule until
        it has stepped ``done`` epochs, counted by its ``last_epoch`` (a resume restores that count;
        a rollback's data goes on: both catch up here)."""
        while self.scheduler.last_epoch < done:
            self.scheduler.step()

    def _named_grads(self) -> Iterable[Tuple[str, torch.Tensor]]:
        """(parameter name without wrapper prefixes, its gradient) on this rank; a DTensor
        gradient (FSDP) is this rank's shard of it."""
        for name, p in self.unwrapped_model.named_parameters():
            if p.grad is not None:
                yield name, p.grad

    def module_grad_norms(self, top: int) -> Dict[str, float]:
        """``{"grad_norm/<module>": norm}`` of the ``top`` modules with the largest gradient norm.
        Shards (DTensors) are summed over ranks, so every rank gets the same global values."""
        grads = list(self._named_grads())
        if not grads:
            return {}
        is_shard = [hasattr(g, "to_local") for _, g in grads]
        squares = torch.stack([(g.to_local() if shard else g).detach().float().pow(2).sum()
                               for (_, g), shard in zip(grads, is_shard)])
        if any(is_shard):
            squares = squares.to(self.device)  # (offloaded shards are on the host; NCCL reduces on the GPU)
            mask = torch.tensor(is_shard, device=squares.device)
            sharded = all_reduce(torch.where(mask, squares, torch.zeros_like(squares)))
            squares = torch.where(mask, sharded, squares)
        totals: Dict[str, float] = {}
        for (name, _), sq in zip(grads, squares.tolist()):
            module = name.rsplit(".", 1)[0] if "." in name else name
            totals[module] = totals.get(module, 0.0) + sq
        largest = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
        return {f"grad_norm/{m}": v ** 0.5 for m, v in largest}

    def _parameters(self) -> List[nn.Parameter]:
        """The wrapped model's parameters, listed once per model (the module walk is ~20-40 us of
        Python a step; wrapping and loading keep the same parameter objects)."""
        cached = getattr(self, "_params_of", None)
        if cached is None or cached[0] is not self.model:
            cached = self._params_of = (self.model, list(self.model.parameters()))
        return cached[1]

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` (0: only measure, the gradients are not touched) and return the
        global pre-clip norm, the same on every rank (every rank then scales by the same factor)."""
        params = [p for p in self._parameters() if p.grad is not None]
        norm = global_grad_norm([p.grad for p in params], self.device)
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    @property
    def lr(self) -> float:
        """The learning rate in force (of the first parameter group)."""
        return self.scheduler.get_last_lr()[0]

    @property
    def unwrapped_model(self) -> nn.Module:
        """The user's module without wrappers (for evaluation helpers and export)."""
        return self.model

    # --- the caller's own module instance (dist_train.fit) -----------------------------------------
    #: Whether ``setup`` changes the module it is given (FSDP's shards; DeepSpeed's ZeRO-3
    #: partitions, bf16/fp16 casts and hooks): a caller's own instance would come back from fit in
    #: pieces, or cast, tied to a process group that is gone. The job then trains a copy and hands
    #: the trained weights back (``hand_back``).
    shards_module: bool = False
    caller_module: Optional[nn.Module] = None  # the caller's instance, when a copy of it is trained

    def sync_buffers(self) -> None:
        """Collective: every rank's buffers take rank 0's values. Each rank updates BatchNorm's
        running statistics from its own batches; DDP copies rank 0's over the others' before every
        forward, FSDP and DeepSpeed never did: a checkpoint kept whichever rank's copy DCP chose
        (so a resumed run evaluated with other statistics than an uninterrupted one), each rank
        evaluated its shard with its own, and fit handed back each rank's own. Called before every
        checkpoint, evaluation and hand-back, so that these see one model, with rank 0's statistics
        as under DDP (the training forward normalises with its batch's, so training is unchanged).
        (``collectives.broadcast_tensors``: one broadcast per dtype; no buffers, no broadcast.)"""
        if self.cluster.world_size > 1 and torch.distributed.is_initialized():
            broadcast_tensors(list(self.unwrapped_model.buffers()), self.device)

    def full_state(self) -> Iterable[Tuple[str, torch.Tensor]]:
        """Collective: ``(name, whole tensor)`` for each parameter and buffer of the trained model,
        one at a time (a sharded strategy gathers each in turn: one whole tensor in memory at once)."""
        model = self.unwrapped_model
        yield from model.named_parameters()
        yield from model.named_buffers()

    def hand_back(self, module: nn.Module) -> None:
        """Collective: copy the trained weights into ``module`` (the caller's instance, of the
        trained model's structure), where it is (its device and dtypes stay)."""
        target = dict(module.named_parameters())
        target.update(module.named_buffers())
        failed: List[str] = []
        self.sync_buffers()  # (rank 0's BatchNorm statistics on every rank, as in the checkpoints)
        with torch.no_grad():
            for name, value in self.full_state():  # (every rank gathers every tensor, whatever fails here)
                if name in target:
                    try:
                        target[name].copy_(value)
                    except RuntimeError as exc:  # (the caller changed the instance's tensors meanwhile)
                        failed.append(f"{name}: {str(exc).splitlines()[0]}")
        if failed and self.cluster.is_rank0:
            logging.getLogger(__name__).warning(
                "the trained weights could not all be copied into the model instance given to fit (%s); the "
                "run's checkpoints hold them all", "; ".join(failed[:3]))

    # --- checkpoints: DCP for the torch-native strategies ----------------------------------------
    #: Written into meta.json as "kind": checkpoints of the same kind share their optimizer format.
    checkpoint_kind: str = "dcp"

    def save_checkpoint(self, files, stage: bool) -> Tuple[Dict[str, Any], Writer]:
        """Collective. Capture this rank's state now; return (small state for meta.json, a function
        that writes the rest into ``files``, perhaps later on another thread). ``stage``: copy the
        tensors to host memory first, so that training may change them during the write."""
        from dist_train.strategy import dcp_state

        state = dcp_state.full_state(self.model, self.optimizer)
        if stage:
            # The optimizer's state and the parameters only its step changes are copied while the
            # next forward and backward run (``before_update`` holds that step until they are);
            # buffers, frozen parameters and the rest at once. Under DDP each rank copies only
            # the replicated tensors it writes (``files.own_share``).
            stepped = self._changed_only_by_step()
            state = files.stage(state, defer=lambda path, t: path[0] == "optim" or _storage_ptr(t) in stepped)
        return self._small_state(), lambda: files.write_state(state)

    def _changed_only_by_step(self) -> Set[int]:
        """The memory (``_storage_ptr``) of the parameters that only the optimizer step changes:
        trainable ones the optimizer holds, except the weights of embeddings with ``max_norm``
        (renormalised in place by their forward)."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        renormed = {id(m.weight) for m in self.model.modules()
                    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None}
        return {_storage_ptr(p) for p in self.model.parameters()
                if p.requires_grad and id(p) in held and id(p) not in renormed}

    def check_checkpoint(self, files, meta: Dict[str, Any], load_optimizer: bool) -> Optional[str]:
        """Why this strategy cannot load the checkpoint described by ``meta`` (None: it can)."""
        from dist_train.strategy import dcp_state

        problem = dcp_state.shape_mismatches(files.stored_shapes(), self.model_shapes())
        if problem:
            return f"it does not fit this model: {problem}"
        if meta.get("kind", "dcp") != self.checkpoint_kind and load_optimizer:
            return dcp_state.foreign_optimizer_reason(meta, self.name)
        return None

    def load_checkpoint(self, files, meta: Dict[str, Any], load_optimizer: bool) -> None:
        """Collective: weights (and, when ``load_optimizer``, the optimizer) from ``files``, and
        the small state from ``meta``."""
        from dist_train.strategy import dcp_state

        if load_optimizer:
            dcp_state.load_full_state(files, self.model, self.optimizer)
        else:
            dcp_state.load_model_state(files, self.model)
        self._load_small_state(meta, fresh_optimizer=not load_optimizer)

    def model_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """``{name: global shape}`` of the model's state, as a checkpoint stores it."""
        from dist_train.strategy import dcp_state

        return dcp_state.model_shapes(self.model)

    def _small_state(self) -> Dict[str, Any]:
        return {"scheduler": scheduler_state(self.scheduler), "scaler": self.precision.state_dict(),
                "param_groups": self.param_group_names()}

    def param_group_names(self) -> Optional[List[List[str]]]:
        """The optimizer's param groups as parameter names, as dist_train's optimizer factory built
        them (DeepSpeed's engine keeps ours inside it); None for an optimizer of another origin.
        Checkpoints record them: an optimizer state loads only into the same groups."""
        from dist_train.train.optim import GROUP_NAMES

        for optimizer in (self.optimizer, getattr(self.optimizer, "optimizer", None)):
            names = getattr(optimizer, GROUP_NAMES, None)
            if names is not None:
                return names
        return None

    def _load_small_state(self, meta: Dict[str, Any], fresh_optimizer: bool) -> None:
        load_scheduler_state(self.scheduler, meta["scheduler"])
        if meta.get("kind", "dcp") == self.checkpoint_kind:
            self.precision.load_state_dict(meta.get("scaler"))
        if fresh_optimizer:  # give the new optimizer the schedule's current learning rate
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr

    def reset_optimizer_state(self) -> None:
        """Forget the optimizer's per-parameter state (AdamW's moments, SGD's momentum): the next
        step starts it afresh, as a new optimizer would. DeepSpeed's engine wraps a torch optimizer
        over its fp32 partitions: that one's state is cleared."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        if not isinstance(inner, torch.optim.Optimizer):
            logging.getLogger(__name__).warning("%s: the state of optimizer %s cannot be reset; it is kept",
                                                self.name, type(inner).__name__)
            return
        inner.state.clear()

    def optimizer_settings(self) -> Tuple[List[Dict[str, Any]], List[float]]:
        """The optimizer's hyperparameters per param group (weight decay, betas, momentum ...) and
        the schedule's peak learning rates, as this run's config built them: taken before a
        checkpoint is loaded, for :meth:`keep_optimizer_settings`."""
        groups = [{k: v for k, v in g.items() if k not in _STATE_OF_GROUP} for g in self.optimizer.param_groups]
        return groups, list(self.scheduler.base_lrs)

    def keep_optimizer_settings(self, settings: Tuple[List[Dict[str, Any]], List[float]]) -> Dict[str, Tuple[Any, Any]]:
        """After a checkpoint load, which brings back the param groups' hyperparameters and the
        schedule's peak learning rates of the run that wrote it: this run's config wins (a resume
        with a new ``train.lr`` or ``train.weight_decay`` trains with it; the schedule's position
        and the optimizer's moments stay the checkpoint's). Returns ``{key: (checkpoint's, config's)}``
        of what changed. Nothing, for a user's own optimizer or scheduler (``settings_from_checkpoint``)."""
        groups, base_lrs = settings
        if self.settings_from_checkpoint:
            differ = sorted({k for group, fresh in zip(self.optimizer.param_groups, groups) for k, v in fresh.items()
                             if k in group and _differs(group[k], v)})
            if differ and self.cluster.is_rank0:
                log.warning("resumed with the checkpoint's optimizer settings (%s), not this run's: an optimizer or "
                            "scheduler of your own is restored as torch's load_state_dict restores it",
                            ", ".join(differ))
            return {}
        changed: Dict[str, Tuple[Any, Any]] = {}
        for group, fresh in zip(self.optimizer.param_groups, groups):
            for key, value in fresh.items():
                if key in group and _differs(group[key], value):
                    changed.setdefault(key, (group[key], value))
                group[key] = value
        old = list(self.scheduler.base_lrs)
        # Other groups (a weights-only resume after train.lr_scale or model.freeze changed): the
        # checkpoint's schedule has a peak per group of its run; this run's groups keep theirs.
        regrouped = len(old) != len(base_lrs)
        peak_changed = regrouped or any(_differs(a, b) for a, b in zip(old, base_lrs))
        if peak_changed:
            if not regrouped:
                changed["lr"] = (old[0], base_lrs[0])
            self.scheduler.base_lrs = list(base_lrs)
        lambdas = getattr(self.scheduler, "lr_lambdas", None)
        before = [g["lr"] for g in self.optimizer.param_groups]
        for i, (group, base) in enumerate(zip(self.optimizer.param_groups, base_lrs)):
            if peak_changed:
                group["initial_lr"] = base
            # This step's learning rate under this run's schedule (LambdaLR's own formula): the
            # checkpoint's is its run's, whose schedule may have been another (a longer
            # train.max_steps stretches cosine and linear; other warmup steps).
            if lambdas is not None:
                group["lr"] = base * lambdas[i](self.scheduler.last_epoch)
            elif peak_changed:
                group["lr"] = group["lr"] * base / old[i] if i < len(old) and old[i] else base
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if not peak_changed and any(_differs(a, g["lr"]) for a, g in zip(before, self.optimizer.param_groups)):
            changed["lr at this step (schedule)"] = (before[0], self.optimizer.param_groups[0]["lr"])
        return changed

    def teardown(self) -> None:
        """Release strategy resources; called on every rank before the process group ends."""


# Checkpoints keep the scheduler's state in meta.json. JSON keeps neither a dict's int keys nor a
# Counter (MultiStepLR's milestones: a resumed MultiStepLR looked its milestones up as strings and
# never decayed again): such dicts are written as tagged item lists and rebuilt on load.
_ITEMS, _COUNTER = "__dist_train_items__", "__dist_train_counter__"


def encode_state(value: Any) -> Any:
    """``value`` (a scheduler's state) with every dict that JSON would change made into a tagged
    item list; the rest as it is."""
    if isinstance(value, dict):
        if isinstance(value, Counter) or not all(isinstance(k, str) for k in value):
            tag = _COUNTER if isinstance(value, Counter) else _ITEMS
            return {tag: [[encode_state(k), encode_state(v)] for k, v in value.items()]}
        return {k: encode_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_state(v) for v in value]
    return value


def decode_state(value: Any) -> Any:
    """The inverse of :func:`encode_state` (a state from an older checkpoint passes unchanged)."""
    if isinstance(value, dict):
        if len(value) == 1 and (_ITEMS in value or _COUNTER in value):
            tag, items = next(iter(value.items()))
            pairs = ((_hashable(decode_state(k)), decode_state(v)) for k, v in items)
            return Counter(dict(pairs)) if tag == _COUNTER else dict(pairs)
        return {k: decode_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    return value


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def scheduler_state(scheduler: Any) -> Dict[str, Any]:
    """A scheduler's state as a checkpoint's meta.json keeps it (see ``encode_state``)."""
    return encode_state(scheduler.state_dict())


def load_scheduler_state(scheduler: Any, state: Dict[str, Any]) -> None:
    scheduler.load_state_dict(decode_state(state))


# A param group's entries that are the run's state, not its config: its parameters, and the
# learning rates the schedule sets (keep_optimizer_settings handles those through base_lrs).
_STATE_OF_GROUP = ("params", "lr", "initial_lr")


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except (RuntimeError, TypeError, ValueError):  # (tensors of several elements: compared whole)
        return not (torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b))


def global_grad_norm(grads: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of all of ``grads`` together, over every rank's shards: a plain tensor.

    Shards of a 1-D mesh (FSDP's DTensors, all ``Shard`` placements) are reduced as local tensors
    (one sum of squares per rank, one all-reduce on ``device``), which skips DTensor's per-tensor dispatch; any
    other DTensor layout goes through DTensor's own norm made whole with ``full_tensor()``.
    """
    if not grads:
        return torch.zeros((), device=device)
    mesh = getattr(grads[0], "device_mesh", None)
    if mesh is not None and mesh.ndim == 1 and all(
            getattr(g, "device_mesh", None) is mesh and all(pl.is_shard() for pl in g.placements) for g in grads):
        local = total_norm([g.to_local() for g in grads]).float()
        # On ``device``: with FSDP's CPU offload the shards are on the host, and the mesh's NCCL
        # group reduces only GPU tensors.
        squares = all_reduce((local * local).to(device), group=mesh.get_group())
        return squares.sqrt()
    norm = total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@torch.no_grad()
def total_norm(tensors: List[torch.Tensor]) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm(tensors)`` (2-norm), the same kernels and result. When all
    are plain tensors of one dtype on one CPU or CUDA device (nearly every model) it skips that
    function's grouping by device and dtype and its ``.to()`` per tensor: host time that a
    launch-bound GPU step waits for (~150 us a step for ResNet-18's 62 gradients)."""
    first = tensors[0]
    dtype, device = first.dtype, first.device
    if device.type in ("cpu", "cuda") and all(
            type(t) is torch.Tensor and t.dtype is dtype and t.device == device for t in tensors):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2.0)), 2.0)
    return torch.nn.utils.get_total_norm(tensors, norm_type=2.0)
