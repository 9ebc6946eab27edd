"""``dcp_state.full_state`` gives exactly ``get_state_dict``'s result after its first call (a replay
of the renames it learned, ~15x cheaper): for plain, DDP-wrapped, torch.compile-wrapped and FSDP2
models, tied and frozen parameters, several parameter groups; and falls back to ``get_state_dict``
when the model or optimizer changed, or when its renames would not reproduce DCP's."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.utils._pytree import tree_map_only

from conftest import spawn
from dist_train.strategy import dcp_state


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: two keys, one parameter

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


class NamedModule(nn.Module):
    """A user's submodule called ``module``: DCP keeps that name (it drops DDP's only)."""

    def __init__(self):
        super().__init__()
        self.module = nn.Linear(4, 4)

    def forward(self, x):
        return self.module(x)


def _trained(model, optimizer, x):
    model(x).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _check(model, optimizer, replayed=True):
    first = dcp_state.full_state(model, optimizer)  # learns
    assert (dcp_state._replays.get(optimizer) is not None) is replayed
    for _ in range(2):
        got = dcp_state.full_state(model, optimizer)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        assert dcp_state._same(got, {"model": model_sd, "optim": optim_sd})
        assert dcp_state._same(first, got)
    return got


def _loads_as_set_state_dict(build):
    """The replay's ``load`` sets model and optimizer exactly as ``set_state_dict`` (non-strict) does."""
    def trained(seed):  # (``build``: a model, its optimizer, an input, and the model whose state is taken)
        torch.manual_seed(seed)
        model, opt, x, *outer = build()
        _trained(model, opt, x)
        return (outer[0] if outer else model), opt

    src, src_opt = trained(0)
    for i, group in enumerate(src_opt.param_groups):
        group["lr"] = 0.0123 * (i + 1)  # hyperparameters come back from the checkpoint too
    saved = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), dcp_state.full_state(src, src_opt))
    (a, a_opt), (b, b_opt) = trained(1), trained(1)
    dcp_state.full_state(a, a_opt)
    replay = dcp_state._replays[a_opt]
    assert replay is not None and replay.current(a, a_opt) is not None
    copy = lambda: tree_map_only(torch.Tensor, lambda t: t.clone(), saved)  # noqa: E731
    replay.load(a, a_opt, copy())
    state = copy()
    set_state_dict(b, b_opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    ga, gb = get_state_dict(a, a_opt), get_state_dict(b, b_opt)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    flat_a, flat_b = [], []
    for tree, out in ((ga, flat_a), (gb, flat_b)):
        tree_map_only(torch.Tensor, lambda t, out=out: out.append(local(t)), tree)
    assert len(flat_a) == len(flat_b) and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b))
    assert ga[1]["param_groups"] == gb[1]["param_groups"]
    assert [g["lr"] for g in a_opt.param_groups] == [0.0123 * (i + 1) for i in range(len(a_opt.param_groups))]
    return a, a_opt


def _shapes_as_dcp_names_them(model):
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items() if isinstance(v, torch.Tensor)}
    assert dcp_state.model_shapes(model) == expected
    return expected


def _tied():
    model = Tied()
    model.body[0].bias.requires_grad_(False)
    opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if n.startswith("embed")]},
                             {"params": [p for n, p in model.named_parameters()
                                         if not n.startswith("embed") and p.requires_grad], "lr": 0.1}])
    return model, opt, torch.randint(0, 10, (4,))


class WithExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def get_extra_state(self):
        return {"note": "not a tensor"}

    def set_extra_state(self, state):
        self.note = state

    def forward(self, x):
        return self.lin(x)


def test_replayed_load_sets_what_set_state_dict_sets():
    _loads_as_set_state_dict(_tied)
    def compiled():  # (trained uncompiled: the wrapper's names are what matter, nothing compiles)
        inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        return inner, torch.optim.SGD(inner.parameters(), lr=0.1, momentum=0.9), torch.randn(3, 4), torch.compile(inner)

    assert next(iter(_loads_as_set_state_dict(compiled)[0].state_dict())).startswith("_orig_mod.")


def test_model_shapes_name_the_tensors_as_get_model_state_dict_does():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    assert "head.weight" in _shapes_as_dcp_names_them(Tied())
    assert list(_shapes_as_dcp_names_them(NamedModule())) == ["module.weight", "module.bias"]  # a user's name
    assert list(_shapes_as_dcp_names_them(torch.compile(NamedModule()))) == ["module.weight", "module.bias"]
    wrapped = nn.Sequential(checkpoint_wrapper(nn.Linear(4, 4)), nn.ReLU())
    assert list(_shapes_as_dcp_names_them(wrapped)) == ["0.weight", "0.bias"]
    assert list(_shapes_as_dcp_names_them(WithExtraState())) == ["lin.weight", "lin.bias"]  # (not its extra state)


def test_plain_tied_frozen_and_grouped_parameters_replay_exactly():
    torch.manual_seed(0)
    model = Tied()
    model.body[0].bias.requires_grad_(False)  # frozen: in the model's state, not the optimizer's
    groups = [{"params": [model.embed.weight], "lr": 0.1},
              {"params": [model.body[0].weight, model.body[1].weight, model.body[1].bias], "lr": 0.01}]
    model, opt = _trained(model, torch.optim.AdamW(groups), torch.randint(0, 10, (16,)))
    got = _check(model, opt)
    assert "head.weight" in got["model"] and "body.1.running_mean" in got["model"]
    assert [g["params"] for g in got["optim"]["param_groups"]] == [["embed.weight"],
                                                                   ["body.0.weight", "body.1.weight", "body.1.bias"]]
    assert got["optim"]["state"]["embed.weight"]["exp_avg"] is opt.state[model.embed.weight]["exp_avg"]


def test_compiled_wrapper_names_are_dropped_as_dcp_drops_them():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(inner.parameters(), lr=0.1, momentum=0.9)
    _trained(inner, opt, torch.randn(4, 4))
    wrapped = torch.compile(inner)  # keys "_orig_mod.0.weight" ...; not run, so nothing compiles
    assert next(iter(wrapped.state_dict())).startswith("_orig_mod.")
    got = _check(wrapped, opt)
    assert list(got["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_users_submodule_named_like_a_wrapper_is_left_to_get_state_dict():
    model = NamedModule()
    model, opt = _trained(model, torch.optim.Adam(model.parameters()), torch.randn(2, 4))
    got = _check(model, opt, replayed=False)  # the replay would drop "module.": not learned
    assert list(got["model"]) == ["module.weight", "module.bias"]


def test_a_changed_model_or_optimizer_is_learned_again_from_get_state_dict(monkeypatch):
    calls = []
    monkeypatch.setattr(dcp_state, "get_state_dict", lambda *a: calls.append(1) or get_state_dict(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model, opt = _trained(model, torch.optim.AdamW(model.parameters()), torch.randn(3, 4))
    _check(model, opt)
    assert len(calls) == 1  # learned at the first call, replayed since

    def changed_then_replayed():
        got = dcp_state.full_state(model, opt)
        assert len(calls) == 2, "a changed model must go through get_state_dict"
        model_sd, optim_sd = get_state_dict(model, opt)
        assert dcp_state._same(got, {"model": model_sd, "optim": optim_sd})
        dcp_state.full_state(model, opt)
        assert len(calls) == 2, "and is replayed again afterwards"
        calls.clear()
        calls.append(1)

    model.register_buffer("extra", torch.ones(2))  # a new key
    changed_then_replayed()
    old = model[1].weight
    model[1].weight = nn.Parameter(old.detach().clone())  # a new parameter in the same place
    opt.param_groups[0]["params"][2] = model[1].weight
    opt.state[model[1].weight] = opt.state.pop(old)
    changed_then_replayed()
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})  # not the model's: DCP refuses
    with pytest.raises(KeyError):
        dcp_state.full_state(model, opt)


def test_an_optimizer_without_state_is_initialised_by_get_state_dict():
    model = nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    got = dcp_state.full_state(model, opt)  # get_state_dict takes a zero step to create the state
    assert set(got["optim"]["state"]) == {"weight", "bias"}
    assert dcp_state._replays.get(opt) is not None


def test_a_first_call_that_leaves_the_optimizer_without_state_learns_later():
    model = nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()  # gradients exist: get_state_dict does not step
    assert dcp_state.full_state(model, opt)["optim"]["state"] == {}
    assert opt not in dcp_state._replays  # not judged yet
    opt.step()
    _check(model, opt)


def _distributed(rank: int, world: int, kind: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        for layer in (model[0], model[2]):
            fully_shard(layer, reshard_after_forward=False)
        fully_shard(model, reshard_after_forward=False)
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(2):
        _trained(model, opt, torch.randn(4, 8))
    got = _check(model, opt)
    assert list(got["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(_shapes_as_dcp_names_them(model)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    if kind == "fsdp":
        assert all(isinstance(v, DTensor) for v in got["model"].values())
        # An evaluation forward that leaves the unsharded parameters registered: still replayed.
        replay = dcp_state._replays[opt]
        with torch.no_grad():
            model(torch.randn(4, 8))
        got = dcp_state.full_state(model, opt)
        assert dcp_state._replays[opt] is replay and all(isinstance(v, DTensor) for v in got["model"].values())
        model_sd, optim_sd = get_state_dict(model, opt)
        assert dcp_state._same(got, {"model": model_sd, "optim": optim_sd})


    def wrapped():
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        if kind == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
        return model, torch.optim.AdamW([{"params": model[0].parameters() if kind == "fsdp" else
                                          model.module[0].parameters()},
                                         {"params": model[2].parameters() if kind == "fsdp" else
                                          model.module[2].parameters(), "lr": 0.5}]), torch.randn(4, 8)

    _loads_as_set_state_dict(wrapped)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_ddp_and_fsdp2_replay_exactly_on_two_ranks(kind):
    spawn(_distributed, 2, kind)


def _two_layers(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _resumed(path, groups, replayed, monkeypatch):
    """A fresh model and optimizer (``groups``: its parameter groups from the model) resumed from
    ``path`` through ``load_full_state``; ``replayed``: whether the replay's load may be used."""
    from dist_train.checkpoint.files import CheckpointFiles

    model = _two_layers(1)
    opt = torch.optim.AdamW(groups(model))
    if not replayed:
        dcp_state._replays[opt] = None  # (never learned: set_state_dict)
    used = []
    real = dcp_state._Replay.load
    monkeypatch.setattr(dcp_state._Replay, "load", lambda self, *a: used.append(1) or real(self, *a))
    dcp_state.load_full_state(CheckpointFiles(path), model, opt)
    monkeypatch.undo()
    return model, opt, bool(used)


@pytest.mark.parametrize("saved_groups, resumed_groups, replayable", [
    # the same groups: the replay's load
    (lambda m: [{"params": m[0].parameters(), "lr": 0.01}, {"params": m[1].parameters(), "lr": 0.02}],
     lambda m: [{"params": m[0].parameters()}, {"params": m[1].parameters()}], True),
    # the groups in another order: by position the layers' state would be swapped
    (lambda m: [{"params": m[1].parameters(), "lr": 0.02}, {"params": m[0].parameters(), "lr": 0.01}],
     lambda m: [{"params": m[0].parameters()}, {"params": m[1].parameters()}], False),
    # a weight-decay split saved, one group resumed (train.weight_decay changed)
    (lambda m: [{"params": [m[0].weight, m[1].weight], "weight_decay": 0.1},
                {"params": [m[0].bias, m[1].bias], "weight_decay": 0.0}],
     lambda m: [{"params": m.parameters()}], False),
])
def test_a_resume_maps_optimizer_state_by_name_whatever_the_groups(tmp_path, monkeypatch, saved_groups,
                                                                  resumed_groups, replayable):
    """The replay's load (``optimizer.load_state_dict``: state and group settings by position) is
    used only when the checkpoint's groups name the optimizer's parameters group by group; other
    groups (another order, another weight-decay split) load as ``set_state_dict`` loads them: each
    parameter's state by its name. Both ways give the same model and optimizer."""
    from dist_train.checkpoint import layout, storage

    src = _two_layers(0)
    src_opt = torch.optim.AdamW(saved_groups(src))
    _trained(src, src_opt, torch.randn(5, 4))
    storage.save(dcp_state.full_state(src, src_opt), str(tmp_path / layout.DCP_DIR))
    a, a_opt, used = _resumed(str(tmp_path), resumed_groups, True, monkeypatch)
    b, b_opt, _ = _resumed(str(tmp_path), resumed_groups, False, monkeypatch)
    assert used is replayable
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ga, gb = a_opt.state_dict(), b_opt.state_dict()
    assert ga["param_groups"] == gb["param_groups"] and ga["state"].keys() == gb["state"].keys()
    for pid in ga["state"]:
        assert all(torch.equal(ga["state"][pid][k], gb["state"][pid][k]) for k in ga["state"][pid])
    names = dict(zip(map(id, src.parameters()), [n for n, _ in src.named_parameters()]))
    saved = {names[id(p)]: st["exp_avg"] for p, st in src_opt.state.items()}
    for name, p in a.named_parameters():  # (each parameter got its own saved moments)
        assert torch.equal(a_opt.state[p]["exp_avg"], saved[name]), name
