"""FSDP's units for a user's model (found by a review of users' habits): blocks that share a
parameter with a module outside them (a weight tied across layers) stay in the root's unit, where
fully_shard used to refuse the model; ``block_classes = ()`` means no units but the root."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conftest import spawn
from dist_train.strategy.fsdp import block_classes, outermost


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        return x + F.relu(self.proj(self.ln(x)))


class Tied(nn.Module):
    """Three blocks, the third's projection weight that of the first (cross-layer sharing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.blocks[2].proj.weight = self.blocks[0].proj.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_blocks_sharing_a_parameter_with_the_outside_are_left_to_the_root():
    model = Tied()
    units, left = outermost(model, block_classes(model))
    assert units == [model.blocks[1]] and left == [model.blocks[0], model.blocks[2]]
    plain = Tied()
    del plain.blocks[2].proj.weight
    plain.blocks[2].proj.weight = nn.Parameter(torch.zeros(8, 8))
    assert outermost(plain, block_classes(plain)) == (list(plain.blocks), [])


def test_an_empty_block_classes_means_no_units():
    model = Tied()
    model.block_classes = ()
    assert block_classes(model) == () and outermost(model, ()) == ([], [])


def _tied_fsdp_trains_like_one_process(rank, world):
    from dist_train.config import load_config
    from dist_train.env.cluster import detect
    from dist_train.strategy import build_strategy
    from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory

    job = load_config(None, ["strategy.name=fsdp", "train.warmup_steps=0", "train.optimizer=sgd", "train.lr=0.1",
                             "train.weight_decay=0", "train.momentum=0", "train.schedule=constant"])
    torch.manual_seed(0)
    reference = Tied()
    strategy = build_strategy(job.strategy, detect(), torch.device("cpu"), "fp32")
    model = Tied()
    model.load_state_dict(reference.state_dict())
    model.blocks[2].proj.weight = model.blocks[0].proj.weight  # (load_state_dict keeps the tie)
    strategy.setup(model, make_optimizer_factory(job.train), make_scheduler_factory(job.train))
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(2 * world, 6, generator=g), torch.randint(0, 3, (2 * world,), generator=g)
        mine = slice(2 * rank, 2 * rank + 2)
        strategy.backward(F.cross_entropy(strategy.model(x[mine]), y[mine]))
        strategy.step(0.0)
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    got = dict(strategy.full_state())
    for name, value in reference.state_dict().items():
        assert torch.allclose(got[name], value, atol=1e-5), name
    strategy.teardown()


def test_fsdp_trains_a_model_with_weights_tied_across_blocks(tmp_path):
    spawn(_tied_fsdp_trains_like_one_process, 2)
