"""A user's script: a plain nn.Module and TensorDataset through dist_train.fit.

Each rank seeds its own init differently on purpose: fit must start every rank from rank 0's
weights. The model returns a tuple, which the classification task handles.
    python fit_parity.py key=value ...  |  torchrun --nproc_per_node=2 fit_parity.py key=value ...

Several jobs in one launch (the test's distributed strategies, to save each launch's start-up):
    torchrun --nproc_per_node=2 fit_parity.py key=value ... --- key=value ...
one ``fit`` after another in the same processes, each with a fresh process group (as a script
that pretrains and then fine-tunes would do). ``TASK=reaching`` (an argument of this script's, not
an override) trains with ``reaching`` below instead of the built-in classification task;
``SAMPLES=N`` trains on the first N samples; ``OPTIM=own`` with a plain loop's own optimizer (SGD with momentum, a learning rate per param
group, built over the module before fit) and scheduler (StepLR), passed to fit.
"""
import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import dist_train

SEP = "---"


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.out(h), h  # (prediction, extras): the task takes the first

    def features(self, x):
        return torch.tanh(self.hidden(x))


def reaching(model, batch):
    """A plain loop's loss that reaches into the model: a method of its own, a submodule called
    directly, and an L2 penalty on a parameter; the model's forward is never called."""
    x, y = batch[0], batch[1]
    logits = model.out(model.features(x))
    penalty = model.out.weight.pow(2).sum()
    return nn.functional.cross_entropy(logits, y) + 1e-2 * penalty, {"penalty": penalty}


def fit_one(overrides):
    task = "classification"
    if "TASK=reaching" in overrides:
        overrides, task = [a for a in overrides if a != "TASK=reaching"], reaching
    own, samples = {}, 512
    for arg in [a for a in overrides if a.startswith("SAMPLES=")]:
        overrides, samples = [a for a in overrides if a != arg], int(arg.split("=", 1)[1])
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(100 + rank)  # different weights on every rank
    model = Plain()
    if "OPTIM=own" in overrides:
        overrides = [a for a in overrides if a != "OPTIM=own"]
        own["optimizer"] = torch.optim.SGD([{"params": model.hidden.parameters(), "lr": 0.02},
                                            {"params": model.out.parameters()}], lr=0.05, momentum=0.9)
        own["scheduler"] = lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, :4] + 0.5 * x[:, 4:]).argmax(dim=1)
    summary = dist_train.fit(model, TensorDataset(x[:samples], y[:samples]), TensorDataset(x[:128], y[:128]), task=task,
                             overrides=overrides, **own)
    run_dir = next(a.split("=", 1)[1] for a in overrides if a.startswith("run.dir="))
    # The instance passed in comes back whole, holding the trained weights, under every strategy
    # (FSDP and ZeRO-3 train a copy of it and hand the weights back).
    from dist_train.checkpoint.weights import load_weights

    saved = load_weights(run_dir)
    state = model.state_dict()
    # Plain: its own class, fp32 tensors (not the bf16 DeepSpeed trained in), no hooks left on it,
    # and it runs as before.
    hooks = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    summary["instance_plain"] = type(model) is Plain and all(type(t) is torch.Tensor and t.dtype == torch.float32
                                                             for t in state.values()) and not hooks
    summary["instance_plain"] = summary["instance_plain"] and model(x[:2])[0].dtype == torch.float32
    summary["instance_is_trained"] = sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in state)
    with open(os.path.join(run_dir, f"fit.rank{rank}.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if isinstance(v, (int, float, str, type(None)))}, f)


if __name__ == "__main__":
    args = sys.argv[1:]
    jobs = [[]]
    for arg in args:
        if arg == SEP:
            jobs.append([])
        else:
            jobs[-1].append(arg)
    for job in jobs:
        fit_one(job)
