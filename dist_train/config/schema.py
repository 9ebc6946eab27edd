"""The typed configuration of a dist_train job.

Every field carries a one-line doc (``metadata["help"]``) that ``--help`` prints. The built-in
defaults are a complete, runnable job. Checks that concern a single section live in that section's
``__post_init__``; checks that need the registries or the machine (a registered strategy, model
or dataset name; a strategy's own limits) live in ``dist_train/preflight.py``. Both run before any
process group starts. This module imports nothing from the rest of the package.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "step", "multistep", "exponential")
SCHEDULER_INTERVALS = ("step", "epoch")
INIT_SCHEMES = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal")
# Image augmentations by name (dist_train/data/transforms.py builds each with fixed parameters).
AUGMENTATIONS = ("random_crop", "random_resized_crop", "hflip", "vflip", "rotation", "color_jitter",
                 "gaussian_blur", "random_erasing")
FAULTS = ("after_shards", "after_commit", "slow_write", "slow_staging", "step_sleep", "nan", "stall", "crash",
          "worker_fork_hang", "startup_stall")
NONFINITE = ("skip", "abort", "rollback")
LOSS_AVERAGES = ("micro_batch", "tokens")
BACKENDS = ("auto", "nccl", "gloo")
# Checkpoint directories are named step_XXXXXXXX (8 digits): a step count past this would make
# checkpoints that resume cannot find.
MAX_STEPS = 10**8 - 1
# torch.manual_seed takes at most 64 bits; restore re-seeds from seed * 1_000_003 + ... mod 2**63.
MAX_SEED = 2**63 - 1


class ConfigError(ValueError):
    """A bad configuration value; ``key`` names the offending dotted key."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def doc(default: Any = None, help: str = "", factory: Any = None) -> Any:
    """A dataclass field with a one-line help text."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _require(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(key, reason)


def _finite(value: float, key: str, lo: float, hi: float = math.inf, lo_open: bool = False,
            hi_open: bool = False) -> None:
    """``value`` is a finite number in [lo, hi] (an end excluded when asked). NaN fails every
    comparison but inf passes ``> 0``: float keys come through here, not a bare comparison."""
    above = value > lo if lo_open else value >= lo
    below = value < hi if hi_open else value <= hi
    if not (math.isfinite(value) and above and below):
        left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
        raise ConfigError(key, f"must be a finite number in {left}{lo:g}, {hi:g}{right}; got {value}")


def _one_of(value: str, choices: tuple, key: str) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class RunConfig:
    name: str = doc("default", "run name; the run directory defaults to runs/<name>")
    dir: str = doc("", "run directory (config.yaml, metrics.jsonl, summary.json, checkpoints/); '' = runs/<run.name>")
    seed: int = doc(0, "global seed for weights, data order and every RNG")
    seed_per_rank: bool = doc(False, "after the model is built, every rank but 0 re-seeds its RNG from (seed, rank): "
                              "dropout masks and random transforms in the training process differ between ranks; "
                              "off (as Lightning's and Accelerate's seeding): every rank draws the same stream, so "
                              "random control flow (layer drop) stays in step under FSDP and DDP")

    def __post_init__(self) -> None:
        # run.dir defaults to runs/<name>: '.' or '..' would put the run into runs/ or the working dir.
        _require(bool(self.name) and "/" not in self.name and self.name not in (".", "..")
                 and self.name.isprintable(), "run.name",
                 f"must be a non-empty name without '/' or control characters, not '.' or '..'; got {self.name!r}")
        _require("\0" not in self.dir, "run.dir", "must not contain a NUL character")
        _require(0 <= self.seed <= MAX_SEED, "run.seed", f"must be in [0, 2**63 - 1]; got {self.seed}")


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = doc(True, "free gathered parameters after forward (ZeRO-3 style); false keeps them until backward")
    cpu_offload: bool = doc(False, "keep sharded parameters, gradients and optimizer state in host memory (GPU only: CPUOffloadPolicy)")
    activation_checkpointing: bool = doc(False, "recompute each block's activations in backward to save memory")
    reduce_dtype: str = doc("fp32", "dtype of gradient reduction under bf16/fp16 precision: fp32 or the compute dtype "
                            "(parameters are cast to train.precision for compute; no effect under fp32)")
    meta_init: bool = doc(True, "build the model on the meta device, shard it, allocate only this rank's shards, then "
                          "fill them from full-size CPU draws of the seeded RNG in the order a plain build uses, one "
                          "parameter at a time: the weights equal single/ddp's exactly and the full model never "
                          "exists on the device; false: build the whole model on the CPU, then shard it")

    def __post_init__(self) -> None:
        _one_of(self.reduce_dtype, ("fp32", "bf16", "fp16"), "strategy.fsdp.reduce_dtype")


@dataclass
class DeepSpeedConfig:
    offload_optimizer: bool = doc(False, "ZeRO: keep optimizer state in host memory (stage 1, 2 or 3; GPU only)")
    offload_param: bool = doc(False, "ZeRO-3: keep parameters in host memory (stage 3 only; GPU only)")
    config: Dict[str, Any] = doc(None, "extra DeepSpeed config entries merged over the one generated from our settings; "
                                 "keys our config owns (batch sizes, accumulation, clipping, precision, zero stage, "
                                 "optimizer, scheduler) may only repeat our values", factory=dict)


@dataclass
class StrategyConfig:
    name: str = doc("auto", "auto (ddp when world size > 1, else single), or a registered strategy: single, ddp, "
                    "fsdp, deepspeed, or one added with dist_train.strategy.register_strategy")
    zero_stage: int = doc(2, "DeepSpeed ZeRO stage: 1, 2 or 3")
    find_unused_parameters: bool = doc(False, "DDP: tolerate parameters that get no gradient")
    bucket_cap_mb: int = doc(25, "DDP: gradient all-reduce bucket size in MiB")
    fsdp: FSDPConfig = doc(help="FSDP2 options", factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = doc(help="DeepSpeed options", factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name), "strategy.name", "must be auto or a registered strategy name")
        _require(self.zero_stage in (1, 2, 3), "strategy.zero_stage", f"must be 1, 2 or 3; got {self.zero_stage}")
        _require(self.bucket_cap_mb > 0, "strategy.bucket_cap_mb", "must be > 0")


@dataclass
class GPTConfig:
    n_layer: int = doc(4, "transformer blocks")
    n_head: int = doc(4, "attention heads per block")
    n_embd: int = doc(128, "embedding width (divisible by n_head)")
    tie_embeddings: bool = doc(True, "share the token embedding with the output head")

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd"):
            _require(getattr(self, key) >= 1, f"model.gpt.{key}", "must be >= 1")
        _require(self.n_embd % self.n_head == 0, "model.gpt.n_head",
                 f"must divide model.gpt.n_embd={self.n_embd}; got {self.n_head}")


@dataclass
class ModelConfig:
    name: str = doc("cnn", "a built-in model (cnn, mlp, resnet18, gpt), a registered one, torchvision:<name> (the "
                    "torchvision zoo), or an import path package.module:builder (called as builder(model.args, info))")
    args: Dict[str, Any] = doc(None, "free-form arguments for an import-path, registered or torchvision model",
                               factory=dict)
    init_from: str = doc("", "start from these weights: a torch.save'd state dict (.pt/.pth), a .safetensors file, "
                         "or a dist_train checkpoint or run dir; mismatched keys (a new head) are reported, not fatal")
    freeze: List[str] = doc(None, "glob patterns of parameter names to freeze, e.g. ['*'] minus what you keep: "
                            "[conv*, layer1.*]; the optimizer only sees trainable parameters", factory=list)
    dropout: float = doc(0.0, "dropout probability; 0 means no dropout layers act")
    hidden: int = doc(128, "hidden width of cnn and mlp")
    init: str = doc("default", "weight init of Linear and Conv layers after the model's own (biases zeroed): "
                    "default (keep the model's), xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal, orthogonal")
    gpt: GPTConfig = doc(help="gpt size", factory=GPTConfig)

    def __post_init__(self) -> None:
        _one_of(self.init, INIT_SCHEMES, "model.init")
        _finite(self.dropout, "model.dropout", 0, 1, hi_open=True)
        _require(self.hidden >= 1, "model.hidden", f"must be >= 1; got {self.hidden}")


@dataclass
class DataConfig:
    name: str = doc("fashion_mnist", "a built-in dataset (fashion_mnist, digits, synthetic_images, shakespeare), a "
                    "registered one, or an import path package.module:builder (returns (train, eval))")
    args: Dict[str, Any] = doc(None, "free-form arguments for an import-path or registered dataset builder",
                               factory=dict)
    root: str = doc("", "dataset folder; '' = the dataset's default location")
    batch_size: int = doc(64, "micro-batch size per rank")
    eval_batch_size: int = doc(256, "evaluation batch size per rank")
    num_workers: int = doc(1, "DataLoader worker processes per rank (0: load in the training process)")
    prefetch_factor: int = doc(2, "batches each worker loads ahead")
    worker_start_timeout_s: float = doc(30.0, "a DataLoader worker not started this long after its fork is stuck "
                                        "in fork() (CPython 3.8-3.11, python/cpython#112275): the workers are "
                                        "killed and started again, from the same batch (3 attempts)")
    seq_len: int = doc(128, "tokens per sample for language datasets")
    synthetic_samples: int = doc(8192, "train samples of synthetic datasets")
    augment: List[str] = doc(None, "image datasets: random augmentations of training samples, in order, from "
                             + ", ".join(AUGMENTATIONS) + "; seeded per (run.seed, epoch, sample)", factory=list)
    normalize: bool = doc(True, "image datasets: standardise pixels with the dataset's mean and std; "
                          "false: pixels in [0, 1]")
    resize: int = doc(0, "image datasets: resize images to resize x resize pixels, train and eval (0: keep the size)")

    def __post_init__(self) -> None:
        for i, name in enumerate(self.augment):
            _require(name in AUGMENTATIONS, f"data.augment[{i}]",
                     f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
        _require(self.resize >= 0, "data.resize", f"must be >= 0 (0: no resize); got {self.resize}")
        for key in ("batch_size", "eval_batch_size", "prefetch_factor", "seq_len", "synthetic_samples"):
            value = getattr(self, key)
            _require(value >= 1, f"data.{key}", f"must be >= 1; got {value}")
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0; got {self.num_workers}")
        _finite(self.worker_start_timeout_s, "data.worker_start_timeout_s", 0, lo_open=True)
        _require("\0" not in self.root, "data.root", "must not contain a NUL character")


@dataclass
class TrainConfig:
    max_steps: int = doc(1500, "optimizer steps to run in total (a resumed run counts the steps already done)")
    epochs: int = doc(0, "train this many passes over the training data instead (0: train.max_steps decides): "
                      "train.max_steps becomes epochs x micro-batches per epoch / grad_accum_steps, set once the "
                      "data is built (config.yaml, the progress line and summary.json show it)")
    grad_accum_steps: int = doc(1, "micro-batches per optimizer step")
    loss_average: str = doc("micro_batch", "what a step's loss is the mean of: micro_batch (each micro-batch's "
                            "own mean, averaged over micro-batches and ranks, as a plain loop computes it) or "
                            "tokens (one mean over every counted target of the global batch: padding (-100) "
                            "and uneven micro-batches weigh nothing; built-in tasks only; one all-reduce a step)")
    precision: str = doc("fp32", "fp32, bf16 (autocast) or fp16 (autocast + gradient scaler; needs a GPU)")
    optimizer: str = doc("adamw", "adamw, adam or sgd (torch.optim.AdamW, Adam, SGD); fit(optimizer=...) takes one "
                                  "of your own (recorded as fit:CLASS)")
    lr: float = doc(1e-3, "peak learning rate")
    lr_scale: Dict[str, float] = doc(None, "per-parameter learning rates: {glob of parameter names: multiplier of "
                                     "train.lr}, first match wins, e.g. {'fc.*': 10, 'layer4.*': 0.5} (a new head "
                                     "faster than a pretrained backbone); each its own param group under every "
                                     "strategy, following the schedule", factory=dict)
    weight_decay: float = doc(0.01, "decoupled weight decay (adamw) or L2 (adam, sgd)")
    decay_norm_and_bias: bool = doc(True, "false: no weight decay on biases and normalisation weights (parameters "
                                    "with ndim <= 1; a second param group with weight_decay 0)")
    betas: List[float] = doc(None, "adamw and adam betas", factory=lambda: [0.9, 0.999])
    momentum: float = doc(0.9, "sgd momentum")
    nesterov: bool = doc(False, "sgd: Nesterov momentum (needs train.momentum > 0)")
    schedule: str = doc("cosine", "learning-rate schedule after warmup: cosine, linear, constant, step (StepLR), "
                        "multistep (MultiStepLR) or exponential (ExponentialLR); fit(scheduler=...) takes one of "
                        "your own (recorded as fit:CLASS; without one the schedule scales fit's own optimizer's rates)")
    warmup_steps: int = doc(50, "linear warmup steps from 0 to train.lr; the schedule counts its steps after them")
    min_lr_ratio: float = doc(0.1, "final learning rate as a fraction of train.lr (cosine, linear)")
    step_size: int = doc(500, "step schedule: multiply the learning rate by train.gamma every this many steps")
    milestones: List[int] = doc(None, "multistep schedule: steps (after warmup) at which the learning rate is "
                                "multiplied by train.gamma", factory=list)
    gamma: float = doc(0.1, "decay factor of the step, multistep (per milestone) and exponential (per step) schedules")
    scheduler_interval: str = doc("step", "when the schedule advances: after every optimizer step, or at the end of "
                                  "every epoch of the training data (epoch: a plain loop's scheduler.step() after "
                                  "each epoch; train.warmup_steps, step_size and milestones then count epochs; "
                                  "not with cosine or linear, which span train.max_steps)")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this (0: no clipping)")
    nonfinite: str = doc("abort", "a non-finite loss or gradient (agreed by every rank): skip (drop that update, "
                         "counted and logged), abort (checkpoint the last good state, stop naming the step), or "
                         "rollback (after train.nonfinite_patience bad steps in a row, reload the last checkpoint "
                         "and continue past the bad batches); fp16 overflow is the gradient scaler's business")
    nonfinite_patience: int = doc(3, "rollback: consecutive non-finite steps before rolling back")
    compile: bool = doc(False, "torch.compile the model, in place (parameter names unchanged); under fsdp each block")
    deterministic: bool = doc(False, "reproducible kernels for the whole job: torch.use_deterministic_algorithms "
                              "(a warning where an op has no deterministic kernel), cuDNN deterministic without "
                              "autotuning, CUBLAS_WORKSPACE_CONFIG=:4096:8; slower on GPUs, where a resumed run "
                              "then matches an uninterrupted one bit for bit (CPU kernels are already)")
    peak_tflops: float = doc(0.0, "peak TFLOP/s of one device at train.precision, for MFU (0: from the table of "
                             "known GPUs; on CPU MFU is reported only when set)")

    def __post_init__(self) -> None:
        _require(1 <= self.max_steps <= MAX_STEPS, "train.max_steps",
                 f"must be in [1, {MAX_STEPS}] (checkpoint names hold 8 digits); got {self.max_steps}")
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1; got {self.grad_accum_steps}")
        _require(self.epochs >= 0, "train.epochs", f"must be >= 0 (0: train.max_steps decides); got {self.epochs}")
        _one_of(self.precision, PRECISIONS, "train.precision")
        # (fit:NAME: dist_train.fit's own optimizer or scheduler, as the run's config records it)
        if not str(self.optimizer).startswith("fit:"):
            _one_of(self.optimizer, OPTIMIZERS, "train.optimizer")
        if not str(self.schedule).startswith("fit:"):
            _one_of(self.schedule, SCHEDULES, "train.schedule")
        _one_of(self.loss_average, LOSS_AVERAGES, "train.loss_average")
        _one_of(self.scheduler_interval, SCHEDULER_INTERVALS, "train.scheduler_interval")
        for pattern, scale in self.lr_scale.items():
            _require(isinstance(scale, (int, float)) and not isinstance(scale, bool), f"train.lr_scale.{pattern}",
                     f"must be a number (a multiplier of train.lr); got {scale!r}")
            _finite(float(scale), f"train.lr_scale.{pattern}", 0, lo_open=True)
        _finite(self.lr, "train.lr", 0, lo_open=True)
        _finite(self.weight_decay, "train.weight_decay", 0)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
                 f"must be two numbers in [0, 1); got {list(self.betas)}")
        # Momentum >= 1 makes SGD's velocity grow without bound; negative momentum is no momentum at all.
        _finite(self.momentum, "train.momentum", 0, 1, hi_open=True)
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _finite(self.min_lr_ratio, "train.min_lr_ratio", 0, 1)
        if self.nesterov:
            _require(self.optimizer == "sgd", "train.nesterov", f"applies to train.optimizer=sgd only; got {self.optimizer}")
            _require(self.momentum > 0, "train.nesterov", "needs train.momentum > 0")
        _require(self.step_size >= 1, "train.step_size", f"must be >= 1; got {self.step_size}")
        _finite(self.gamma, "train.gamma", 0, 1, lo_open=True)
        _require(all(m >= 1 for m in self.milestones), "train.milestones",
                 f"must be steps >= 1; got {list(self.milestones)}")
        if self.schedule == "multistep":
            _require(len(self.milestones) > 0, "train.milestones",
                     "train.schedule=multistep needs at least one milestone, e.g. train.milestones=[300,600]")
        _finite(self.grad_clip, "train.grad_clip", 0)
        _one_of(self.nonfinite, NONFINITE, "train.nonfinite")
        _require(self.nonfinite_patience >= 1, "train.nonfinite_patience", f"must be >= 1; got {self.nonfinite_patience}")
        _finite(self.peak_tflops, "train.peak_tflops", 0)


@dataclass
class EvalConfig:
    every_steps: int = doc(0, "evaluation cadence in optimizer steps (0: only at the end)")
    every_epochs: int = doc(0, "also evaluate after the optimizer step that ends every this many epochs of the "
                            "training data (0: no; a plain loop's validation after each epoch is 1)")
    max_batches: int = doc(0, "evaluate on at most this many batches per rank (0: the whole held-out split)")

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "eval.every_steps", "must be >= 0")
        _require(self.every_epochs >= 0, "eval.every_epochs", "must be >= 0")
        _require(self.max_batches >= 0, "eval.max_batches", "must be >= 0")


@dataclass
class CheckpointConfig:
    every_steps: int = doc(0, "save cadence in optimizer steps (0: only at the end; a run always saves when it ends or is preempted)")
    every_epochs: int = doc(0, "also save after the optimizer step that ends every this many epochs of the training "
                            "data (0: no)")
    best_metric: str = doc("", "keep the checkpoint of the best evaluation by this metric (eval_loss, "
                           "eval_accuracy, ...): saved when an evaluation improves on the best so far, named by "
                           "checkpoints/best.json, never pruned, shown in summary.json's best (empty: none)")
    best_mode: str = doc("auto", "min, max, or auto (min for a loss, perplexity, error or bits per byte; else max)")
    resume: str = doc("auto", "auto (newest verified checkpoint of the run dir), never, or a checkpoint path (must verify)")
    keep_last: int = doc(3, "keep this many newest checkpoints (0: keep all); the newest is never deleted")
    async_save: bool = doc(False, "write checkpoints in the background while training goes on (also accepted as checkpoint.async)")
    on_save_error: str = doc("raise", "a save that fails (full disk, read-only dir) keeps the previous checkpoint "
                             "intact; raise: the run stops (exit 1); continue: warn and try again at the next cadence")
    load_optimizer: bool = doc(True, "restore the optimizer state on resume; false restores weights, step, data position, "
                                     "LR schedule and RNG with a fresh optimizer (needed between deepspeed and the other strategies)")
    sha256: bool = doc(True, "also record each file's SHA-256 in manifest.json (for outside tools; dist_train verifies "
                             "with the XXH3-128 it takes while writing): rank 0 adds them in the background after each "
                             "commit, and the end of a run waits for the last")

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
        _require(self.every_epochs >= 0, "checkpoint.every_epochs", "must be >= 0")
        _one_of(self.best_mode, ("auto", "min", "max"), "checkpoint.best_mode")
        _require(not self.best_metric or self.best_metric.startswith("eval_"), "checkpoint.best_metric",
                 f"names an evaluation metric (eval_loss, eval_accuracy, ...); got {self.best_metric!r}")
        _require(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
        _one_of(self.on_save_error, ("raise", "continue"), "checkpoint.on_save_error")
        _require(bool(self.resume), "checkpoint.resume", "must be auto, never or a path")


@dataclass
class MLflowConfig:
    enabled: bool = doc(True, "log the run to MLflow (rank 0 only)")
    tracking_uri: str = doc("", "MLflow tracking URI (http://host:5000, sqlite:///file.db, ...); '' = "
                            "$MLFLOW_TRACKING_URI if set, else sqlite:///<run.dir>/mlflow.db. Credentials: MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN")
    experiment: str = doc("dist_train", "MLflow experiment name")
    log_model: bool = doc(False, "log the final checkpoint's weights as model/model.safetensors (a completed run)")
    flush_timeout_s: float = doc(30.0, "wait at most this long for MLflow: for the run to open at start, "
                                 "for queued metrics and artifacts at exit")

    def __post_init__(self) -> None:
        # config.yaml and the params are logged to MLflow: a password in the URI would be too.
        netloc = self.tracking_uri.split("://", 1)[1].split("/", 1)[0] if "://" in self.tracking_uri else ""
        _require("@" not in netloc, "logging.mlflow.tracking_uri",
                 "must not hold credentials (they would be logged with the config); set "
                 "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
        _require(bool(self.experiment.strip()), "logging.mlflow.experiment", "must be a non-empty name")
        # inf would make the exit wait forever for an unreachable server.
        _finite(self.flush_timeout_s, "logging.mlflow.flush_timeout_s", 0, lo_open=True)


@dataclass
class TensorBoardConfig:
    enabled: bool = doc(False, "rank 0 also writes the logged scalars to <run.dir>/tensorboard (torch.utils.tensorboard)")


@dataclass
class LoggingConfig:
    every_steps: int = doc(10, "how often rank 0 logs metrics (metrics.jsonl, MLflow, console)")
    progress_bar: str = doc("auto", "auto (a bar on a terminal, step log lines otherwise), on (a bar), lines (step "
                            "log lines, on a terminal too) or off (neither: warnings, errors and the closing lines)")
    level: str = doc("INFO", "console log level")
    grad_norms: int = doc(0, "at logging steps, also log the gradient norms of the K modules with the largest ones "
                          "(grad_norm/<module>; 0: off)")
    mlflow: MLflowConfig = doc(help="MLflow tracking", factory=MLflowConfig)
    tensorboard: TensorBoardConfig = doc(help="TensorBoard event files", factory=TensorBoardConfig)

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "logging.every_steps", f"must be >= 1; got {self.every_steps}")
        _require(self.grad_norms >= 0, "logging.grad_norms", f"must be >= 0; got {self.grad_norms}")
        # YAML reads a bare on/off as a boolean; take it as the word the user wrote.
        self.progress_bar = {"True": "on", "False": "off"}.get(str(self.progress_bar), self.progress_bar)
        _one_of(self.progress_bar, ("auto", "on", "lines", "off"), "logging.progress_bar")
        _one_of(self.level, ("DEBUG", "INFO", "WARNING", "ERROR"), "logging.level")


@dataclass
class DebugConfig:
    faults: str = doc("", "fault injection for tests of recovery paths, comma-separated: after_shards[@STEP] (exit "
                      "before a checkpoint commit), after_commit[@STEP[:RANK]] (exit right after it), slow_write=SECONDS, slow_staging=SECONDS, step_sleep=SECONDS, "
                      "nan@STEP[:RANK] (NaN inputs), stall@STEP[:RANK]=SECONDS, crash@STEP[:RANK], worker_fork_hang[@:RANK] "
                      "(the first DataLoader worker forked hangs inside fork()), startup_stall[@:RANK]=SECONDS (a stall "
                      "before the resume); '' in production")
    record_sample_ids: bool = doc(False, "each rank appends the dataset indices of every micro-batch to "
                                  "<run.dir>/sample_ids.rank<r>.jsonl (proves a resume neither replays nor skips)")

    def __post_init__(self) -> None:
        for item in filter(None, (x.strip() for x in self.faults.split(","))):
            name = item.partition("=")[0].partition("@")[0]
            _one_of(name, FAULTS, "debug.faults")
            step, _, rank = item.partition("=")[0].partition("@")[2].partition(":")
            _require((not step or step.isdigit()) and (not rank or rank.isdigit()), "debug.faults",
                     f"write NAME[@STEP[:RANK]][=VALUE]; got {item!r}")


@dataclass
class TaskConfig:
    name: str = doc("", "classification, language_model, regression, a registered task, or an import path "
                    "package.module:task (task(model, batch) -> loss or (loss, metrics)); '' = the dataset's own")


@dataclass
class DistConfig:
    backend: str = doc("auto", "process-group backend: auto (nccl on GPUs, gloo on the CPU), nccl, or gloo (on GPUs "
                       "for single and ddp only; several ranks may then share one GPU, e.g. to run a multi-rank job "
                       "on a one-GPU machine)")
    init_timeout_s: float = doc(600.0, "process-group start-up: how long a rank waits for rank 0's store and for every "
                                "other rank to join before it fails naming the missing ranks (also the collective "
                                "timeout until the first step is done)")
    timeout_s: float = doc(600.0, "collective timeout after the first step (a rank stuck that long fails the job), "
                                  "checkpoint saves' and preemption's collectives included")
    watchdog_factor: float = doc(10.0, "the hang watchdog dumps this rank's stacks to <run.dir>/hangs/ when a phase "
                                 "lasts this many times the recent median iteration ...")
    watchdog_floor_s: float = doc(120.0, "... and at least this many seconds (0: no watchdog); in a multi-process job "
                                  "never later than 3/4 of the collective timeout (min of the two above)")

    def __post_init__(self) -> None:
        _require(self.backend in BACKENDS, "dist.backend", f"must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        _require(0 < self.init_timeout_s < float("inf"), "dist.init_timeout_s",
                 f"must be a finite number of seconds > 0; got {self.init_timeout_s}")
        _require(0 < self.timeout_s < float("inf"), "dist.timeout_s",
                 f"must be a finite number of seconds > 0; got {self.timeout_s}")
        _finite(self.watchdog_factor, "dist.watchdog_factor", 1)
        _require(0 <= self.watchdog_floor_s < float("inf"), "dist.watchdog_floor_s",
                 f"must be a finite number >= 0; got {self.watchdog_floor_s}")


@dataclass
class JobConfig:
    run: RunConfig = doc(help="run identity", factory=RunConfig)
    strategy: StrategyConfig = doc(help="parallelism", factory=StrategyConfig)
    model: ModelConfig = doc(help="model", factory=ModelConfig)
    data: DataConfig = doc(help="data", factory=DataConfig)
    train: TrainConfig = doc(help="optimisation", factory=TrainConfig)
    task: TaskConfig = doc(help="loss and metrics", factory=TaskConfig)
    eval: EvalConfig = doc(help="evaluation", factory=EvalConfig)
    checkpoint: CheckpointConfig = doc(help="checkpointing", factory=CheckpointConfig)
    logging: LoggingConfig = doc(help="logging", factory=LoggingConfig)
    dist: DistConfig = doc(help="process group", factory=DistConfig)
    debug: DebugConfig = doc(help="test and debugging aids (off by default)", factory=DebugConfig)
