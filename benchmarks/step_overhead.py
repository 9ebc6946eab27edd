"""What dist_train's optimizer step costs over a hand-written one, on the very same wrapped model.

    PYTHONPATH=. torchrun --nproc_per_node=2 benchmarks/step_overhead.py --workload lm-fsdp [--precision bf16]

On a GPU machine each rank takes its GPU (NCCL) and the timings wait for the GPU's queue to
drain, so a host synchronisation inside a step shows as the GPU time it no longer overlaps.

Between processes, a 2-core machine's noise (10-20% between runs) hides a few percent of overhead.
Here one process builds the job with dist_train's builder (strategy, data, task) and then
alternates, in blocks, between ways of doing the same step on the same model and optimizer:

- ``plain``: ``loss = cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()``
  (under DeepSpeed: ``engine.backward(loss); engine.step()``);
- ``train_step``: dist_train's ``train_step`` as the loop calls it (norm for the non-finite check;
  under DeepSpeed, the agreed loss check before the update);
- ``train_step (no finite check)``: the same without either (``finite_grads=False``, no veto);
- ``train_step + preemption flag``: ``train_step`` and what the loop adds after a step that does
  not log, evaluate or save (the asynchronous preemption all-reduce, the phase clock).

Every variant takes its batch from dist_train's sampler and loader, so data handling is the same.
Medians of per-block mean step times are printed with their ratio to ``plain``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import workloads as wk  # noqa: E402
from dist_train.env.cluster import detect  # noqa: E402
from dist_train.env.preemption import PreemptionWatcher  # noqa: E402
from dist_train.train.build import build_parts  # noqa: E402
from dist_train.train.job import set_cpu_threads  # noqa: E402
from dist_train.train.loop import micro_batches  # noqa: E402
from dist_train.train.nonfinite import NonFiniteGuard  # noqa: E402
from dist_train.train.phases import PhaseClock  # noqa: E402
from dist_train.train.state import TrainState  # noqa: E402
from dist_train.train.step import train_step  # noqa: E402
from dist_train.train.tasks import batches_without_indices, split_batch, to_device  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="lm-fsdp", choices=wk.WORKLOAD_NAMES)
    p.add_argument("--blocks", type=int, default=6, help="blocks per variant (alternating)")
    p.add_argument("--steps", type=int, default=5, help="steps per block")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args()
    from dist_train.config import load_config

    wl = wk.workload(args.workload, args.smoke)
    job = load_config(None, [*wk.train_overrides(wl, 10 ** 6), f"train.precision={args.precision}"])
    cluster = detect()
    if torch.cuda.is_available():
        device = torch.device("cuda", cluster.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    set_cpu_threads(cluster)
    parts = build_parts(job, cluster, device)
    strategy, task = parts.strategy, parts.task
    data = batches_without_indices(micro_batches(parts.loader, parts.sampler, TrainState()))  # as the job does
    clock = PhaseClock()

    engine = strategy.model if strategy.name == "deepspeed" else None

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def plain() -> None:
        x, y = split_batch(to_device(next(data), strategy.device))
        with autocast:
            loss = wk.loss_of(strategy.model(x), y)
        if engine is not None:  # what a hand-written DeepSpeed loop does
            engine.backward(loss)
            engine.step()
            return
        loss.backward()
        strategy.optimizer.step()
        strategy.optimizer.zero_grad(set_to_none=True)

    # As the loop calls it: where the strategy cannot check the global norm (DeepSpeed), every
    # rank's loss is checked and the flags agreed before the update.
    guard = NonFiniteGuard("skip", 1, strategy.device)
    veto = None if strategy.global_grad_norm else guard.veto
    preemption = PreemptionWatcher(strategy.device)  # its own gloo group, as in a real run

    def loop_step() -> None:  # what the loop adds on a step that neither logs, evaluates nor saves
        train_step(strategy, data, job.train, task, veto, 0, clock, finite_grads=True)
        preemption.requested()
        clock.iteration_done(0)

    variants = {
        "plain": plain,
        "train_step + preemption flag": loop_step,
        "train_step": lambda: train_step(strategy, data, job.train, task, veto, 0, clock, finite_grads=True),
        "train_step (no finite check)": lambda: train_step(strategy, data, job.train, task, None, 0, clock,
                                                           finite_grads=False),
    }
    for fn in variants.values():  # warm-up
        for _ in range(3):
            fn()
    times = {name: [] for name in variants}
    names = list(variants)
    for block in range(args.blocks):
        for name in names[block % len(names):] + names[:block % len(names)]:
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    if cluster.is_rank0:
        base = statistics.median(times["plain"])
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
        print(f"{args.workload} ({args.precision}, {strategy.name}): {args.blocks} blocks x {args.steps} steps, {where}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:32s} {med * 1e3:8.1f} ms/step  x{med / base:.3f}  (blocks {min(ts) * 1e3:.0f}-"
                  f"{max(ts) * 1e3:.0f} ms)")
    preemption.close()
    parts.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
