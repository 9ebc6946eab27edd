"""A fresh optimizer (a process about to resume) gets exactly its checkpoint's state, as
``torch.load`` + ``optimizer.load_state_dict`` would give it, without DCP's zero-gradient optimizer
step (``dcp_state.seed_optimizer_state``); any state it cannot place leaves DCP's own way."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from conftest import spawn
from dist_train.checkpoint.files import CheckpointFiles
from dist_train.strategy import dcp_state


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _trained(make_opt, steps=3):
    torch.manual_seed(0)
    model = Net()
    opt = make_opt(model)
    for _ in range(steps):
        model(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _saved(tmp_path, make_opt):
    model, opt = _trained(make_opt)
    files = CheckpointFiles(str(tmp_path))
    files.write_state(dcp_state.full_state(model, opt))
    return model, opt, files


def _fresh(make_opt):
    torch.manual_seed(1)  # other weights than the saved ones
    model = Net()
    opt = make_opt(model)
    steps = []
    opt.register_step_pre_hook(lambda *_: steps.append(1))
    return model, opt, steps


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for pid in sa["state"]:
        assert sa["state"][pid].keys() == sb["state"][pid].keys()
        for key, value in sa["state"][pid].items():
            other = sb["state"][pid][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (pid, key)


ADAMW = lambda m: torch.optim.AdamW([{"params": m.body.parameters()}, {"params": m.head.parameters(), "lr": 0.1}])  # noqa: E731
SGD = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731


@pytest.mark.parametrize("make_opt", [ADAMW, SGD], ids=["adamw", "sgd-momentum"])
def test_a_fresh_optimizer_resumes_exactly_without_an_optimizer_step(tmp_path, make_opt):
    model, opt, files = _saved(tmp_path, make_opt)
    fresh, fresh_opt, steps = _fresh(make_opt)
    assert dcp_state.seed_optimizer_state(fresh, fresh_opt, files.metadata())
    fresh_opt.state.clear()
    dcp_state.load_full_state(files, fresh, fresh_opt)
    assert steps == []  # DCP's initialisation would have stepped the optimizer (lr 0, zero gradients)
    _same_state(opt, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    # And training goes on exactly as it would have.
    x = torch.randn(5, 6)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).pow(2).mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def _adamw_with(**kernels):
    return lambda m: torch.optim.AdamW([{"params": m.body.parameters()}, {"params": m.head.parameters(), "lr": 0.1}],
                                       **kernels)


@pytest.mark.parametrize("written,resumed", [({"foreach": True}, {"fused": True}), ({"fused": True}, {"foreach": True})],
                         ids=["foreach-to-fused", "fused-to-foreach"])
def test_a_resume_keeps_this_runs_kernels_not_the_checkpoints(tmp_path, written, resumed):
    """optimizer.load_state_dict takes every group setting from the checkpoint, fused/foreach
    too: a run resumed on another device or strategy (a GPU's fused checkpoint into CPU FSDP
    shards, an older foreach checkpoint into a fused run) keeps the kernels it chose; the state
    and the training that follows are the same up to the kernels' rounding."""
    model, opt, files = _saved(tmp_path, _adamw_with(**written))
    fresh, fresh_opt, _ = _fresh(_adamw_with(**resumed))
    dcp_state.load_full_state(files, fresh, fresh_opt)
    for group in fresh_opt.param_groups:
        assert bool(group.get("fused")) == bool(resumed.get("fused"))
        assert bool(group.get("foreach")) == bool(resumed.get("foreach"))
    for p, state in fresh_opt.state.items():
        assert state["step"].device == p.device and float(state["step"]) == 3.0
        assert torch.equal(state["exp_avg"], opt.state[dict(zip(fresh.parameters(), model.parameters()))[p]]["exp_avg"])
    x = torch.randn(5, 6)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(x).pow(2).mean().backward()
        o.step()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(model.parameters(), fresh.parameters()))


class Unused(nn.Module):
    """A trainable head the loss never reaches: AdamW gives it no state."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


def test_a_parameter_that_never_had_a_gradient_resumes_without_state(tmp_path):
    torch.manual_seed(0)
    model = Unused()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    files = CheckpointFiles(str(tmp_path))
    files.write_state(dcp_state.full_state(model, opt))
    for live in (False, True):  # a fresh process's resume; a rollback of a live optimizer
        fresh = Unused()
        fresh_opt = torch.optim.AdamW(fresh.parameters())
        if live:
            fresh(torch.randn(2, 3)).sum().backward()
            fresh_opt.step()
        dcp_state.load_full_state(files, fresh, fresh_opt)  # (DCP's own way: "Missing key ... unused.weight")
        _same_state(opt, fresh_opt)
        assert fresh.unused.weight not in fresh_opt.state


def test_a_stateless_optimizer_is_left_to_dcp(tmp_path):
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731  (no state at all)
    _model, _opt, files = _saved(tmp_path, make)
    fresh, fresh_opt, _ = _fresh(make)
    assert not dcp_state.seed_optimizer_state(fresh, fresh_opt, files.metadata())
    dcp_state.load_full_state(files, fresh, fresh_opt)
    assert fresh_opt.state_dict()["param_groups"][0]["lr"] == 0.1


def test_state_it_cannot_place_leaves_the_optimizer_untouched(tmp_path):
    _model, _opt, files = _saved(tmp_path, ADAMW)
    metadata = files.metadata()
    fresh, fresh_opt, _ = _fresh(ADAMW)
    # A stored parameter this model does not have.
    paths = dict(metadata.planner_data)
    key = next(k for k, p in paths.items() if p[:2] == ("optim", "state"))
    paths[key] = ("optim", "state", "nowhere.weight", paths[key][3])
    renamed = type(metadata)(metadata.state_dict_metadata, planner_data=paths)
    assert not dcp_state.seed_optimizer_state(fresh, fresh_opt, renamed)
    # Nested state below a parameter's entry.
    paths = dict(metadata.planner_data)
    paths[key] = (*paths[key], "inner")
    assert not dcp_state.seed_optimizer_state(fresh, fresh_opt, type(metadata)(metadata.state_dict_metadata,
                                                                                planner_data=paths))
    # A stored tensor shaped unlike its parameter (a factored second moment, say).
    shaped = dict(metadata.state_dict_metadata)
    weight = next(k for k, p in metadata.planner_data.items() if p[:2] == ("optim", "state") and p[3] == "exp_avg"
                  and len(metadata.state_dict_metadata[k].size) == 2)
    meta = shaped[weight]
    shaped[weight] = type(meta)(meta.properties, torch.Size([meta.size[0]]), meta.chunks)
    assert not dcp_state.seed_optimizer_state(fresh, fresh_opt, type(metadata)(shaped,
                                                                                planner_data=metadata.planner_data))
    # An index without DCP's key paths.
    assert not dcp_state.seed_optimizer_state(fresh, fresh_opt, type(metadata)(metadata.state_dict_metadata))
    assert not fresh_opt.state


def test_a_failed_load_leaves_a_fresh_optimizer_fresh(tmp_path):
    _model, _opt, files = _saved(tmp_path, ADAMW)
    shard = next(f for f in os.listdir(files.dcp_dir) if f.endswith(".distcp"))
    os.truncate(os.path.join(files.dcp_dir, shard), 100)
    fresh, fresh_opt, _ = _fresh(ADAMW)
    with pytest.raises(Exception):
        dcp_state.load_full_state(files, fresh, fresh_opt)
    assert not fresh_opt.state


def _fsdp(rank: int, world: int, path: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def sharded(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    model, opt = sharded(0)
    for _ in range(2):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    files = CheckpointFiles(path)
    files.write_state(dcp_state.full_state(model, opt))
    fresh, fresh_opt = sharded(1)
    steps = []
    fresh_opt.register_step_pre_hook(lambda *_: steps.append(1))
    dcp_state.load_full_state(files, fresh, fresh_opt)
    assert steps == []
    for p, q in zip(opt.param_groups[0]["params"], fresh_opt.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            got = fresh_opt.state[q][key]
            assert type(got) is type(value)
            if isinstance(value, DTensor):
                assert got.placements == value.placements and torch.equal(got.to_local(), value.to_local())
            else:
                assert torch.equal(got, value)


def test_fsdp2_sharded_state_resumes_into_a_fresh_optimizer_on_two_ranks(tmp_path):
    spawn(_fsdp, 2, str(tmp_path / "ckpt"))
