"""The hand-written PyTorch loops dist_train is measured against: what a user would write.

    torchrun --nproc_per_node=2 benchmarks/ref_loops.py --workload vision-ddp --steps 20 --out r.json

``vision-ddp``: ``DistributedDataParallel``; ``lm-fsdp``: ``fully_shard`` on each transformer block
and then the root (FSDP2); ``lm-zero2``: ``deepspeed.initialize`` with ZeRO stage 2. No framework:
a ``DistributedSampler`` over a ``TensorDataset``, forward, loss, backward, ``optimizer.step()``.
The model, data and optimizer settings are the workload's (see ``workloads.py``).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import workloads as wk


def wrap_ddp(model, opt_cfg):
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(model)
    opt = wk.adamw(model.parameters(), opt_cfg)

    def step(x, y):
        loss = wk.loss_of(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, "torch DistributedDataParallel (gloo)"


def wrap_fsdp(model, opt_cfg):
    from torch.distributed.fsdp import fully_shard

    for block in [m for m in model.modules() if isinstance(m, model.block_classes)]:
        fully_shard(block)
    fully_shard(model)
    opt = wk.adamw(model.parameters(), opt_cfg)

    def step(x, y):
        loss = wk.loss_of(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, f"torch fully_shard (FSDP2) on {len(model.block_classes)} block class(es) + root (gloo)"


def wrap_zero2(model, opt_cfg, micro_batch: int, world: int):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # As dist_train does: without this DeepSpeed's CPU backend JIT-builds (minutes of C++) a
    # shared-memory all-reduce that only its inference path uses; training runs on gloo.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    opt = wk.adamw(model.parameters(), opt_cfg)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "train_batch_size": micro_batch * world, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)

    def step(x, y):
        loss = wk.loss_of(engine(x), y)
        engine.backward(loss)
        engine.step()

    return step, f"deepspeed {deepspeed.__version__} ZeRO-2 engine ({deepspeed.get_accelerator().device_name()})"


def main() -> None:
    args = wk.runner_args(__doc__.splitlines()[0])
    wl = wk.workload(args.workload, args.smoke)
    job = wk.load_job(wl, args.steps)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    wk.set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    model, train_ds, _info = wk.build_work(job)
    if wl.parallel == "ddp":
        step, ran = wrap_ddp(model, job.train)
    elif wl.parallel == "fsdp":
        step, ran = wrap_fsdp(model, job.train)
    else:
        step, ran = wrap_zero2(model, job.train, job.data.batch_size, world)
    data = TensorDataset(train_ds.x, train_ds.y)
    sampler = DistributedSampler(data, shuffle=True, seed=job.run.seed, drop_last=True)
    loader = DataLoader(data, batch_size=job.data.batch_size, sampler=sampler, drop_last=True)
    result = wk.timed_steps(args.steps, wk.epochs(loader, sampler), step, job.data.batch_size * world, rank)
    if rank == 0:
        wk.write_result(args.out, {**result, "ran": ran, "world_size": world, "threads": torch.get_num_threads()})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
