"""Hugging Face Accelerate running the workload: ``accelerator.prepare`` around the user's loop.

    torchrun --nproc_per_node=2 benchmarks/peer_accelerate.py --workload lm-fsdp --steps 15 --out r.json

For ``lm-fsdp`` it is asked for FSDP2 (an ``FullyShardedDataParallelPlugin(fsdp_version=2)``
wrapping each block class); on a CPU-only machine Accelerate runs multi-CPU DDP instead, and the
result's ``ran`` says what actually ran (the distributed type and the prepared module's class).
Model, data and AdamW settings are the workload's (see ``workloads.py``).
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, TensorDataset

import workloads as wk


def fsdp2_plugin(block_classes):
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                          auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=[c.__name__ for c in block_classes])


def main() -> None:
    import accelerate
    from accelerate import Accelerator

    args = wk.runner_args(__doc__.splitlines()[0])
    wl = wk.workload(args.workload, args.smoke)
    if wl.parallel not in ("ddp", "fsdp"):
        raise SystemExit(f"peer_accelerate: no Accelerate runner for the {wl.parallel!r} workload")
    job = wk.load_job(wl, args.steps)
    cuda = torch.cuda.is_available()
    model, train_ds, _info = wk.build_work(job)
    plugin = fsdp2_plugin(model.block_classes) if wl.parallel == "fsdp" else None
    accelerator = Accelerator(cpu=not cuda, mixed_precision="no", fsdp_plugin=plugin)
    wk.set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    loader = DataLoader(TensorDataset(train_ds.x, train_ds.y), batch_size=job.data.batch_size,
                        shuffle=True, drop_last=True)
    if accelerator.distributed_type.name == "FSDP":  # FSDP2 wants the optimizer after the model
        model = accelerator.prepare(model)
        opt, loader = accelerator.prepare(wk.adamw(model.parameters(), job.train), loader)
    else:
        model, opt, loader = accelerator.prepare(model, wk.adamw(model.parameters(), job.train), loader)

    def step(x, y):
        loss = wk.loss_of(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    world = accelerator.num_processes
    result = wk.timed_steps(args.steps, wk.epochs(loader, None), step, job.data.batch_size * world,
                            accelerator.process_index)
    asked = "FSDP2" if plugin is not None else "DDP"
    ran = (f"Accelerate {accelerate.__version__} {accelerator.distributed_type.name} ({type(model).__name__}, "
           f"{accelerator.device}; asked for {asked})")
    if accelerator.is_main_process:
        wk.write_result(args.out, {**result, "ran": ran, "world_size": world, "threads": torch.get_num_threads()})
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
