"""Lightning Fabric running the workload: the peer a user would pick to keep their own loop.

    torchrun --nproc_per_node=2 benchmarks/peer_fabric.py --workload lm-fsdp --steps 15 --out r.json

``vision-ddp``: Fabric's ``DDPStrategy``; ``lm-fsdp``: ``ModelParallelStrategy`` (Fabric's FSDP2
path, the one that runs on CPU), whose ``parallelize_fn`` calls ``fully_shard`` on each block and
then the root, exactly as dist_train and the hand-written loop shard. Model, data and AdamW
settings are the workload's (see ``workloads.py``); Fabric adds the ``DistributedSampler``.
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, TensorDataset

import workloads as wk


def shard_blocks(model, device_mesh):
    """FSDP2 per transformer block, then the root (Fabric's ``parallelize_fn``)."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for block in [m for m in model.modules() if isinstance(m, model.block_classes)]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_strategy(parallel: str, world: int):
    from lightning.fabric.strategies import DDPStrategy, ModelParallelStrategy

    if parallel == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if parallel == "fsdp":
        return ModelParallelStrategy(parallelize_fn=shard_blocks, data_parallel_size=world, tensor_parallel_size=1)
    raise SystemExit(f"peer_fabric: no Fabric runner for the {parallel!r} workload")


def main() -> None:
    import lightning
    from lightning.fabric import Fabric

    args = wk.runner_args(__doc__.splitlines()[0])
    wl = wk.workload(args.workload, args.smoke)
    job = wk.load_job(wl, args.steps)
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    fabric = Fabric(accelerator="cpu", devices=local, num_nodes=world // local, precision="32-true",
                    strategy=make_strategy(wl.parallel, world))
    fabric.launch()  # under torchrun: joins the ranks torchrun started, spawns nothing
    wk.set_threads(local)
    model, train_ds, _info = wk.build_work(job)
    model = fabric.setup_module(model)  # ModelParallelStrategy wants the optimizer built after this
    opt = fabric.setup_optimizers(wk.adamw(model.parameters(), job.train))
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(train_ds.x, train_ds.y),
                                                 batch_size=job.data.batch_size, shuffle=True, drop_last=True))

    def step(x, y):
        loss = wk.loss_of(model(x), y)
        fabric.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = wk.timed_steps(args.steps, wk.epochs(loader, loader.sampler), step, job.data.batch_size * world,
                            fabric.global_rank)
    inner = type(getattr(model, "module", model)).__name__
    ran = f"Lightning Fabric {lightning.__version__} {type(fabric.strategy).__name__} ({inner}, {fabric.device})"
    if fabric.global_rank == 0:
        wk.write_result(args.out, {**result, "ran": ran, "world_size": world, "threads": torch.get_num_threads()})
    fabric.barrier()


if __name__ == "__main__":
    main()
