"""The same job as a script, with dist_train.fit:

    python examples/own_project/train.py                              # one process
    torchrun --nproc_per_node=2 examples/own_project/train.py [key=value ...]
"""
import os
import sys

import torch

import dist_train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import build  # noqa: E402
from losses import smooth_ce  # noqa: E402
from model import RingNet  # noqa: E402

if __name__ == "__main__":
    train, held_out, _ = build({"samples": 3000})
    model = RingNet(hidden=64)           # (a zero-argument builder works too: lambda: RingNet(hidden=64))
    # Your own optimizer, as a plain loop builds it: dist_train rebuilds it over the parameters the
    # strategy trains (FSDP's shards) by name. config.yaml's warmup and cosine schedule scale its
    # rate (or pass scheduler=lambda opt: ... of your own).
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    summary = dist_train.fit(
        model, train, held_out, task=smooth_ce, optimizer=optimizer,
        config=os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml"),
        overrides=["run.name=own_project_fit", *sys.argv[1:]],
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"eval_acc {summary.get('eval_acc')}, eval_loss {summary['eval_loss']:.4f}, status {summary['status']}")
