"""Training throughput of dist_train against a plain PyTorch loop, measured in the same run.

    .venv/bin/python benchmarks/throughput.py [--steps 300] [--model cnn] [--data fashion_mnist] [--precision bf16]
                                              [--explain]

Both loops train the same model on the same in-memory dataset with the same micro-batch, AdamW
and thread count, on the GPU when there is one; the plain loop has no framework at all (no
sampler, no metrics, no progress).
Both leave out their first 5 steps as warm-up. Prints samples/s of each and the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dist_train.config import load_config  # noqa: E402
from dist_train.data import build_datasets  # noqa: E402
from dist_train.env.cluster import detect  # noqa: E402
from dist_train.models import build_model  # noqa: E402
from dist_train.train.job import run_job  # noqa: E402

WARMUP = 5


def plain_loop(job, steps: int, device: torch.device) -> float:
    """What a user writes: the model on the device, a DataLoader of CPU tensors copied over per
    step (pinned, non-blocking on a GPU), autocast for bf16/fp16 (with a GradScaler for fp16)."""
    torch.manual_seed(0)
    train_ds, _, info = build_datasets(job.data)
    model = build_model(job.model, info).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=job.train.lr)
    cuda = device.type == "cuda"
    plain_ds = torch.utils.data.TensorDataset(train_ds.x, train_ds.y)  # what a plain script would use
    loader = torch.utils.data.DataLoader(plain_ds, batch_size=job.data.batch_size, shuffle=True, drop_last=True,
                                         pin_memory=cuda)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    it, done, t0 = iter(loader), 0, None
    while done < steps:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        done += 1
        if done == WARMUP:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
    return (steps - WARMUP) * job.data.batch_size / (time.perf_counter() - t0)


# What the loop calls around each optimizer step (``--explain`` times each of them, host time),
# by the module and name its caller looks it up under.
LOOP_PARTS = (
    ("dist_train.train.loop", "train_step"),  # data, forward, backward, optimizer (its own phases)
    ("dist_train.train.nonfinite", "NonFiniteGuard.after_step"),
    ("dist_train.train.reporting", "Reporter.maybe_log"),       # metrics at logging steps, progress
    ("dist_train.train.evaluate", "Evaluator.maybe_run"),
    ("dist_train.checkpoint.manager", "CheckpointManager.maybe_save"),
    ("dist_train.env.preemption", "PreemptionWatcher.requested"),
    ("dist_train.train.phases", "PhaseClock.iteration_done"),
    ("dist_train.train.goodput", "GoodputLedger.maybe_update"),
    ("dist_train.train.job", "train"),  # the whole loop: what is left is the loop's own lines
)


@contextlib.contextmanager
def explained(totals: dict):
    """Wrap each of LOOP_PARTS with a host timer for the duration (a diagnosis of where a step's
    time goes beyond the phases, e.g. the "other" of the step-time breakdown): ``totals[name] =
    [calls, seconds]``."""
    import importlib

    undo = []

    def timer(name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = totals.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - t0
        return timed

    for module_name, name in LOOP_PARTS:
        owner = importlib.import_module(module_name)
        *path, attr = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, attr)
        setattr(owner, attr, timer(name, original))
        undo.append((owner, attr, original))
    try:
        yield totals
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


def print_explained(totals: dict, steps: int) -> None:
    _, loop_s = totals.pop("train", [1, 0.0])
    print(f"where dist_train's loop spends host time ({steps} steps, us per step; a GPU's work shows only where "
          f"the host waits for it):")
    inside = 0.0
    for name, (calls, seconds) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        inside += seconds
        print(f"  {name:34s} {seconds / steps * 1e6:9.1f}   ({calls} calls)")
    print(f"  {'the loop body itself':34s} {(loop_s - inside) / steps * 1e6:9.1f}")
    print(f"  {'whole loop':34s} {loop_s / steps * 1e6:9.1f}")


def framework_loop(overrides, steps: int, explain: bool = False) -> tuple:
    with tempfile.TemporaryDirectory() as tmp, (explained({}) if explain else contextlib.nullcontext()) as totals:
        job = load_config(None, [*overrides, f"train.max_steps={steps}", f"run.dir={tmp}", "eval.max_batches=1",
                                 "checkpoint.resume=never", "logging.mlflow.enabled=false", "logging.progress_bar=off"])
        assert run_job(job, detect()) == 0
        with open(os.path.join(tmp, "summary.json")) as f:
            summary = json.load(f)
        if totals is not None:
            print_explained(totals, steps)
        return summary["samples_per_s"], summary.get("time_breakdown", {})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--model", default="cnn")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (fp16: GPU only)")
    p.add_argument("--explain", action="store_true",
                   help="also time each part of dist_train's loop per step (the last round; host time)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what dist_train picks too
    overrides = [f"model.name={args.model}", f"data.name={args.data}", f"data.batch_size={args.batch_size}",
                 "data.num_workers=0", "train.grad_clip=0", f"train.precision={args.precision}"]
    job = load_config(None, overrides)
    torch.set_num_threads(os.cpu_count() or 1)
    # Alternate the two loops so that load from anything else on the machine hits both alike.
    plains, ours_all, breakdowns = [], [], []
    for r in range(args.repeats):
        plains.append(plain_loop(job, args.steps, device))
        torch.set_num_threads(os.cpu_count() or 1)
        sps, breakdown = framework_loop(overrides, args.steps, explain=args.explain and r == args.repeats - 1)
        ours_all.append(sps)
        breakdowns.append(breakdown)
        torch.set_num_threads(os.cpu_count() or 1)
    plain, ours = statistics.median(plains), statistics.median(ours_all)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"model={args.model} data={args.data} batch={args.batch_size} precision={args.precision} steps={args.steps} "
          f"device={where} repeats={args.repeats}")
    print(f"plain PyTorch loop : {plain:10.1f} samples/s  (rounds: {', '.join(f'{v:.0f}' for v in plains)})")
    print(f"dist_train single  : {ours:10.1f} samples/s  (rounds: {', '.join(f'{v:.0f}' for v in ours_all)})")
    print(f"ratio dist_train/plain: {ours / plain:.3f}")
    last = breakdowns[-1]
    total = sum(last.values()) or 1.0
    print("dist_train's time by phase (last round, whole run): " +
          ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in sorted(last.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
