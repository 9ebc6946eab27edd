"""Checkpoint save/load time of dist_train against plain torch.save/torch.load of the same state,
measured in the same run, and the training-thread blocking time of an async save.

    .venv/bin/python benchmarks/checkpoint_bench.py [--model mlp] [--hidden 2048] [--repeats 5]

One process, one device (the single strategy), AdamW with its state allocated (one step taken).
Both sides write to the same filesystem and fsync (a checkpoint that is not on disk is not one):

- plain save: ``torch.save({"model", "optim"})`` to one file, then fsync.
- dist_train save: everything a real checkpoint does: staging dir, RNG and meta files, DCP shards,
  SHA-256 of every file, manifest, fsyncs, rename, ``latest``, retention.
- plain load: ``torch.load(weights_only=True)`` + ``load_state_dict`` of model and optimizer.
- dist_train load: what a resume does: choose the newest checkpoint, verify every hash, DCP load,
  set model/optimizer/scheduler state, RNG, train state.
- async: the time ``save()`` blocks the training thread (a host-memory copy of the state), and
  the time until the background write is committed.

Prints medians over ``--repeats`` and the ratios dist_train / plain.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dist_train.checkpoint import CheckpointManager  # noqa: E402
from dist_train.config import load_config, to_dict  # noqa: E402
from dist_train.data import build_datasets  # noqa: E402
from dist_train.env.cluster import detect  # noqa: E402
from dist_train.models import build_model  # noqa: E402
from dist_train.strategy import build_strategy  # noqa: E402
from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory  # noqa: E402
from dist_train.train.state import TrainState  # noqa: E402


def build(overrides):
    job = load_config(None, overrides)
    torch.manual_seed(0)
    _, _, info = build_datasets(job.data)
    strategy = build_strategy(job.strategy, detect(), torch.device("cpu"), "fp32")
    strategy.setup(build_model(job.model, info), make_optimizer_factory(job.train), make_scheduler_factory(job.train))
    x = torch.randn(8, *info.input_shape)
    torch.nn.functional.cross_entropy(strategy.model(x), torch.randint(0, info.num_classes, (8,))).backward()
    strategy.step(1.0)  # AdamW state allocated
    return job, strategy


def manager(job, strategy, run_dir):
    return CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job), micro_global_batch=job.data.batch_size,
                             grad_accum_steps=1, seed=0)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp")
    p.add_argument("--data", default="digits")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    args = p.parse_args()
    overrides = [f"model.name={args.model}", f"data.name={args.data}", f"model.hidden={args.hidden}",
                 "strategy.name=single", "checkpoint.keep_last=2", "logging.mlflow.enabled=false"]
    job, strategy = build(overrides)
    state_bytes = sum(t.numel() * t.element_size() for t in strategy.model.state_dict().values())
    state_bytes += sum(v.numel() * v.element_size() for s in strategy.optimizer.state.values()
                       for v in s.values() if torch.is_tensor(v))
    res = {k: [] for k in ("plain_save", "dt_save", "plain_load", "dt_load", "async_block", "async_total")}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        plain = os.path.join(tmp, "plain.pt")

        def plain_save():
            with open(plain, "wb") as f:
                torch.save({"model": strategy.model.state_dict(), "optim": strategy.optimizer.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())

        def plain_load():
            sd = torch.load(plain, weights_only=True)
            strategy.model.load_state_dict(sd["model"])
            strategy.optimizer.load_state_dict(sd["optim"])

        sync = manager(job, strategy, os.path.join(tmp, "sync"))
        job_async = load_config(None, [*overrides, "checkpoint.async_save=true"])
        asyn = manager(job_async, strategy, os.path.join(tmp, "async"))
        for i in range(1, args.repeats + 1):
            res["plain_save"].append(timed(plain_save))
            res["dt_save"].append(timed(lambda: sync.save(TrainState(step=i))))
            res["plain_load"].append(timed(plain_load))
            res["dt_load"].append(timed(lambda: sync.resume(TrainState())))
            t0 = time.perf_counter()
            asyn.save(TrainState(step=i))
            res["async_block"].append(time.perf_counter() - t0)
            asyn.wait()
            res["async_total"].append(time.perf_counter() - t0)
        sync.close()
        asyn.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"state: {state_bytes / 2**20:.1f} MiB (model {args.model}, hidden {args.hidden}, AdamW), "
          f"median of {args.repeats}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  save  plain torch.save+fsync {med['plain_save'] * 1e3:8.1f} ms | dist_train {med['dt_save'] * 1e3:8.1f} ms "
          f"| ratio {med['dt_save'] / med['plain_save']:.2f}x")
    print(f"  load  plain torch.load       {med['plain_load'] * 1e3:8.1f} ms | dist_train {med['dt_load'] * 1e3:8.1f} ms "
          f"| ratio {med['dt_load'] / med['plain_load']:.2f}x  (dist_train verifies every SHA-256 first)")
    print(f"  async save: blocks training {med['async_block'] * 1e3:8.1f} ms, committed after "
          f"{med['async_total'] * 1e3:8.1f} ms | blocking / plain save {med['async_block'] / med['plain_save']:.2f}x")


if __name__ == "__main__":
    main()
