"""Training throughput of dist_train against a plain PyTorch loop, measured in the same run.

    .venv/bin/python benchmarks/throughput.py [--steps 300] [--model cnn] [--data fashion_mnist]

Both loops train the same model on the same in-memory dataset with the same micro-batch, AdamW
and thread count; the plain loop has no framework at all (no sampler, no metrics, no progress).
Both leave out their first 5 steps as warm-up. Prints samples/s of each and the ratio.
"""
from __future__ import annotations

import argparse
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


def plain_loop(job, steps: int) -> float:
    torch.manual_seed(0)
    train_ds, _, info = build_datasets(job.data)
    model = build_model(job.model, info)
    opt = torch.optim.AdamW(model.parameters(), lr=job.train.lr)
    plain_ds = torch.utils.data.TensorDataset(train_ds.x, train_ds.y)  # what a plain script would use
    loader = torch.utils.data.DataLoader(plain_ds, batch_size=job.data.batch_size, shuffle=True, drop_last=True)
    it, done, t0 = iter(loader), 0, None
    while done < steps:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        if done == WARMUP:
            t0 = time.perf_counter()
    return (steps - WARMUP) * job.data.batch_size / (time.perf_counter() - t0)


def framework_loop(overrides, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        job = load_config(None, [*overrides, f"train.max_steps={steps}", f"run.dir={tmp}", "eval.max_batches=1",
                                 "checkpoint.resume=never", "logging.mlflow.enabled=false", "logging.progress_bar=off"])
        assert run_job(job, detect()) == 0
        with open(os.path.join(tmp, "summary.json")) as f:
            return json.load(f)["samples_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--model", default="cnn")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    args = p.parse_args()
    overrides = [f"model.name={args.model}", f"data.name={args.data}", f"data.batch_size={args.batch_size}",
                 "data.num_workers=0", "train.grad_clip=0"]
    job = load_config(None, overrides)
    torch.set_num_threads(os.cpu_count() or 1)
    # Alternate the two loops so that load from anything else on the machine hits both alike.
    plains, ours_all = [], []
    for _ in range(args.repeats):
        plains.append(plain_loop(job, args.steps))
        torch.set_num_threads(os.cpu_count() or 1)
        ours_all.append(framework_loop(overrides, args.steps))
        torch.set_num_threads(os.cpu_count() or 1)
    plain, ours = statistics.median(plains), statistics.median(ours_all)
    print(f"model={args.model} data={args.data} batch={args.batch_size} steps={args.steps} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"plain PyTorch loop : {plain:10.1f} samples/s  (rounds: {', '.join(f'{v:.0f}' for v in plains)})")
    print(f"dist_train single  : {ours:10.1f} samples/s  (rounds: {', '.join(f'{v:.0f}' for v in ours_all)})")
    print(f"ratio dist_train/plain: {ours / plain:.3f}")


if __name__ == "__main__":
    main()
