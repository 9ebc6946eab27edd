"""An import-path model, dataset and task for the CLI tests (``tests/scripts`` is the working dir)."""
import torch
from torch import nn
from torch.utils.data import TensorDataset


def build_net(args, info):
    return nn.Sequential(nn.Linear(6, int(args.get("hidden", 16))), nn.ReLU(), nn.Linear(int(args.get("hidden", 16)), 1))


def build_data(args):
    g = torch.Generator().manual_seed(int(args.get("seed", 0)))
    x = torch.randn(int(args.get("n", 256)), 6, generator=g)
    y = x.sum(dim=1, keepdim=True)
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:]), {"task": "regression"}


class Jittered(torch.utils.data.Dataset):
    """A user's dataset with its own random transform: noise from torch's, random's and numpy's
    global generators, drawn in __getitem__ (in a DataLoader worker with data.num_workers > 0)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        import random

        import numpy as np

        x, y = self.base[i]
        noise = 0.1 * torch.randn(x.shape) + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return x + noise, y


def build_jittered_data(args):
    train, test, info = build_data(args)
    return Jittered(train), test, info


class SignalledAt(torch.utils.data.Dataset):
    """Sends this process SIGTERM (a preemption) when its ``at``-th sample is fetched: with
    num_workers=0, in the training process, while it fetches the batch of a chosen step."""

    def __init__(self, base, at):
        self.base, self.at, self.fetched = base, at, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        import os
        import signal

        self.fetched += 1
        if self.fetched == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.base[i]


def build_signalled_data(args):
    train, test, info = build_data(args)
    return SignalledAt(train, int(args["sigterm_at_sample"])), test, info


def l1_task(model, batch):
    x, y = batch[0], batch[1]
    pred = model(x)
    return (pred - y).abs().mean(), {"max_err": (pred - y).abs().max()}


def raises(args, info):
    raise RuntimeError("the builder's own message")


def not_a_module(args, info):
    return 42


_calls = {"n": 0}


def fails_on_rank_1(model, batch):
    """Cross-entropy, until rank 1's third micro-batch: then a task's own error on that rank only."""
    import torch.distributed as dist

    _calls["n"] += 1
    if _calls["n"] == 3 and dist.is_initialized() and dist.get_rank() == 1:
        raise RuntimeError("the task's own error on rank 1")
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
