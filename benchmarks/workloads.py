"""What every runner of ``benchmarks/compare.py`` trains, and how every runner times it.

One source of truth for the work: a workload is a list of dist_train ``key=value`` overrides.
dist_train gets them on its command line; the reference runners (``ref_loops.py``,
``peer_fabric.py``, ``peer_accelerate.py``) resolve the very same list with dist_train's config
loader and read model, data, batch size and optimizer settings from the result. So every runner
trains the same module (built by ``dist_train.models.build_model``), on the same tensors (built by
``dist_train.data.build_datasets``), with the same AdamW settings and kernel, in fp32.

Timing is dist_train's own accounting (DESIGN.md, ``samples_per_s`` in ``summary.json``): the
time of each optimizer step, batch fetch included, summed over every step after the first
``WARMUP_STEPS`` of the process. Rank 0 also prints a progress line (``[rank0] step K/N``) at the
end of the warm-up and of the last step, at which ``launch.py`` measures wall time and CPU time
from the outside, as it does at dist_train's own progress lines.
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

WARMUP_STEPS = 5  # DESIGN.md: samples_per_s leaves out the first 5 optimizer steps of the process


@dataclass(frozen=True)
class Workload:
    """One line of the comparison: a model, its data and the parallelism every runner uses."""

    name: str
    parallel: str  # "ddp", "fsdp" or "zero2": what the reference runners must do
    overrides: Tuple[str, ...]  # dist_train key=value for model, data and strategy


# The sizes: ResNet-18 on 3x32x32 images, per-rank batch 32; gpt 4 x 256, 4 heads,
# context 128, byte vocabulary (256), per-rank batch 8. Synthetic images: only as many as the
# steps need (a few epochs' worth would be 100 MB per rank and time spent drawing them).
_VISION = ("model.name=resnet18", "data.name=synthetic_images", "data.synthetic_samples=2048",
           "data.batch_size=32", "data.eval_batch_size=32")
_LM = ("model.name=gpt", "model.gpt.n_layer=4", "model.gpt.n_embd=256", "model.gpt.n_head=4",
       "data.name=shakespeare", "data.seq_len=128", "data.batch_size=8", "data.eval_batch_size=8")
# --smoke: the smallest sizes that still run every code path.
_VISION_SMOKE = ("model.name=resnet18", "data.name=synthetic_images", "data.synthetic_samples=256",
                 "data.batch_size=4", "data.eval_batch_size=4")
_LM_SMOKE = ("model.name=gpt", "model.gpt.n_layer=2", "model.gpt.n_embd=32", "model.gpt.n_head=2",
             "data.name=shakespeare", "data.seq_len=16", "data.batch_size=2", "data.eval_batch_size=2")

_PARALLEL = {"vision-ddp": ("ddp", ("strategy.name=ddp",)),
             "lm-fsdp": ("fsdp", ("strategy.name=fsdp",)),
             "lm-zero2": ("zero2", ("strategy.name=deepspeed", "strategy.zero_stage=2"))}
WORKLOAD_NAMES = tuple(_PARALLEL)


def workload(name: str, smoke: bool = False) -> Workload:
    """The workload ``name`` (one of ``WORKLOAD_NAMES``) at full or smoke size."""
    if name not in _PARALLEL:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    parallel, strategy = _PARALLEL[name]
    if name.startswith("vision"):
        sizes = _VISION_SMOKE if smoke else _VISION
    else:
        sizes = _LM_SMOKE if smoke else _LM
    return Workload(name, parallel, sizes + strategy)


def train_overrides(wl: Workload, steps: int) -> List[str]:
    """The full dist_train override list of a run of ``steps`` optimizer steps.

    Same work as the reference loops: AdamW at dist_train's defaults, fp32, a constant learning
    rate, no gradient clipping, data loaded in the training process (no worker processes), no
    evaluation or checkpoint during the timed steps.
    """
    return [*wl.overrides, f"train.max_steps={steps}", "train.precision=fp32", "train.optimizer=adamw",
            "train.grad_clip=0", "train.schedule=constant", "train.warmup_steps=0", "train.grad_accum_steps=1",
            "data.num_workers=0", "eval.every_steps=0", "eval.max_batches=1", "checkpoint.every_steps=0",
            "checkpoint.resume=never"]


def load_job(wl: Workload, steps: int):
    """The resolved dist_train config of the workload (what the reference runners read)."""
    from dist_train.config import load_config

    return load_config(None, train_overrides(wl, steps))


def build_work(job) -> Tuple[object, object, object]:
    """``(model, train_ds, info)`` exactly as dist_train builds them, on the CPU, seeded."""
    import torch

    from dist_train.data import build_datasets
    from dist_train.models import build_model

    torch.manual_seed(job.run.seed)
    train_ds, _eval_ds, info = build_datasets(job.data)
    model = build_model(job.model, info)
    return model, train_ds, info


def adamw(params, train_cfg):
    """The optimizer every runner uses: ``torch.optim.AdamW`` with dist_train's settings, and the
    kernel dist_train picks for the same parameters (``optim.implementation``: fused on a CPU or
    GPU, foreach over FSDP's shards where fused is not safe), so that the ratios measure the
    framework around the step, not the choice of kernel (torch's default on a CPU is its
    per-parameter loop: AdamW over a ResNet-18 is 38 ms against 7 ms fused, 2 cores)."""
    import torch

    from dist_train.train.optim import implementation

    trained = [p for p in params if p.requires_grad]
    kernel = implementation([{"params": trained}], "adamw", str(train_cfg.precision))
    return torch.optim.AdamW(trained, lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                             weight_decay=train_cfg.weight_decay, **kernel)


def loss_of(logits, target):
    """Mean cross-entropy; [B, T, V] language-model logits are flattened over tokens."""
    import torch.nn.functional as F

    if logits.dim() == 3:
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())
    return F.cross_entropy(logits, target)


def set_threads(local_world_size: int) -> int:
    """Split the cores between the local ranks, as dist_train does (torchrun would give one each)."""
    import torch

    share = max(1, (os.cpu_count() or 1) // max(local_world_size, 1))
    torch.set_num_threads(share)
    return share


def epochs(loader, sampler=None) -> Iterator[Sequence]:
    """Endless batches: a new epoch (reshuffled by ``sampler.set_epoch``) when one runs out."""
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def rss_mib() -> float:
    """This process's resident set now (Linux ``/proc/self/statm``), in MiB."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed_steps(steps: int, batches: Iterator[Sequence], step: Callable[[object, object], None],
                global_batch: int, rank: int) -> Dict[str, float]:
    """Run ``step(x, y)`` on ``steps`` batches and time them as dist_train does."""
    if steps <= WARMUP_STEPS:
        raise ValueError(f"--steps must exceed the {WARMUP_STEPS} warm-up steps; got {steps}")
    times: List[float] = []
    for i in range(steps):
        t0 = time.perf_counter()
        x, y = next(batches)[:2]
        step(x, y)
        times.append(time.perf_counter() - t0)
        if rank == 0 and i + 1 in (WARMUP_STEPS, steps):  # the marks launch.py measures at
            print(f"[rank0] step {i + 1}/{steps}", flush=True)
    measured = times[WARMUP_STEPS:]
    busy = sum(measured)
    return {"samples_per_s": global_batch * len(measured) / busy, "global_batch": global_batch,
            "step_time_s": busy / len(measured), "steps": steps, "measured_steps": len(measured),
            "train_rss_mib": rss_mib(),
            "rank_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def write_result(path: str, result: Dict[str, object]) -> None:
    """Rank 0 writes its result for compare.py (atomically: a half-written file is never read)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def runner_args(description: str):
    """The command line every reference runner takes."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workload", required=True, choices=WORKLOAD_NAMES)
    p.add_argument("--steps", type=int, required=True, help=f"optimizer steps, the first {WARMUP_STEPS} untimed")
    p.add_argument("--smoke", action="store_true", help="the smallest sizes")
    p.add_argument("--out", required=True, help="result JSON written by rank 0")
    return p.parse_args()
