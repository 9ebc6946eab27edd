"""Schedules equal torch.optim.lr_scheduler's step by step; optimizers and weight-decay groups."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched

from dist_train.config.load import load_config
from dist_train.config.schema import ConfigError
from dist_train.train.optim import lr_factor, make_optimizer_factory, make_scheduler_factory, param_groups
from tests.conftest import spawn

LR = 0.1
MAX_STEPS = 40


def train_cfg(*overrides: str):
    return load_config(None, [f"train.lr={LR}", f"train.max_steps={MAX_STEPS}", *overrides]).train


def torch_main(name: str, opt: torch.optim.Optimizer, cfg) -> sched.LRScheduler:
    """torch's own scheduler for the phase after warmup."""
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    if name == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=span, eta_min=cfg.min_lr_ratio * LR)
    if name == "linear":
        return sched.LinearLR(opt, start_factor=1.0, end_factor=cfg.min_lr_ratio, total_iters=span)
    if name == "constant":
        return sched.ConstantLR(opt, factor=1.0)
    if name == "step":
        return sched.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if name == "multistep":
        return sched.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    return sched.ExponentialLR(opt, gamma=cfg.gamma)


def torch_schedule(opt: torch.optim.Optimizer, cfg) -> sched.LRScheduler:
    main = torch_main(cfg.schedule, opt, cfg)
    if cfg.warmup_steps == 0:
        return main
    # start_factor == end_factor when warmup_steps == 1: total_iters is then irrelevant (but must be > 0).
    warmup = sched.LinearLR(opt, start_factor=1.0 / cfg.warmup_steps, end_factor=1.0,
                            total_iters=max(cfg.warmup_steps - 1, 1))
    return sched.SequentialLR(opt, [warmup, main], milestones=[cfg.warmup_steps])


def lrs(scheduler: sched.LRScheduler, opt: torch.optim.Optimizer, steps: int) -> list:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    return out


SCHEDULE_CASES = [
    ("cosine", ["train.min_lr_ratio=0.1"]),
    ("cosine", ["train.min_lr_ratio=0.0"]),
    ("linear", ["train.min_lr_ratio=0.2"]),
    ("linear", ["train.min_lr_ratio=0.0"]),
    ("constant", []),
    ("step", ["train.step_size=7", "train.gamma=0.5"]),
    ("multistep", ["train.milestones=[5,12,12,30]", "train.gamma=0.3"]),
    ("exponential", ["train.gamma=0.9"]),
]


@pytest.mark.parametrize("warmup", [0, 1, 6])
@pytest.mark.parametrize("name,extra", SCHEDULE_CASES)
def test_schedule_equals_torch_scheduler(name, extra, warmup):
    cfg = train_cfg(f"train.schedule={name}", f"train.warmup_steps={warmup}", "train.decay_norm_and_bias=false", *extra)
    # Two param groups (decay / no decay): the schedule must move both.
    model = nn.Linear(3, 2)
    ours_opt = make_optimizer_factory(cfg)(model.parameters())
    assert len(ours_opt.param_groups) == 2
    ours = lrs(make_scheduler_factory(cfg)(ours_opt), ours_opt, MAX_STEPS)
    ref_opt = make_optimizer_factory(cfg)(nn.Linear(3, 2).parameters())
    ref = lrs(torch_schedule(ref_opt, cfg), ref_opt, MAX_STEPS)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for x, y in zip(a, b):
            assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-15), f"step {step}: ours {x} != torch {y}"


def test_cosine_linear_constant_keep_their_formula():
    """The historic schedules (the ones checkpoints and earlier runs used), by their closed form."""
    cfg = train_cfg("train.warmup_steps=4", "train.min_lr_ratio=0.1")
    assert lr_factor(0, cfg) == 0.25 and lr_factor(3, cfg) == 1.0
    assert lr_factor(4, cfg) == 1.0
    mid = 4 + (MAX_STEPS - 4) // 2
    assert math.isclose(lr_factor(mid, cfg), 0.1 + 0.9 * 0.5)
    assert math.isclose(lr_factor(MAX_STEPS, cfg), 0.1)
    lin = train_cfg("train.schedule=linear", "train.warmup_steps=0", "train.min_lr_ratio=0.0")
    assert math.isclose(lr_factor(10, lin), 0.75)
    assert lr_factor(10_000, lin) == 0.0  # clamped after max_steps, never negative
    const = train_cfg("train.schedule=constant", "train.warmup_steps=2")
    assert [lr_factor(s, const) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("name,extra", SCHEDULE_CASES)
def test_scheduler_state_round_trips(name, extra):
    """A checkpointed scheduler state (numbers only) restores the same LR in a fresh scheduler."""
    cfg = train_cfg(f"train.schedule={name}", "train.warmup_steps=3", *extra)
    opt = make_optimizer_factory(cfg)(nn.Linear(3, 2).parameters())
    s = make_scheduler_factory(cfg)(opt)
    for _ in range(17):
        opt.step()
        s.step()
    state = s.state_dict()
    assert "lr_lambdas" in state and all(x is None for x in state["lr_lambdas"])
    opt2 = make_optimizer_factory(cfg)(nn.Linear(3, 2).parameters())
    s2 = make_scheduler_factory(cfg)(opt2)
    s2.load_state_dict(state)
    opt2.step()
    s.step()
    s2.step()
    assert s2.get_last_lr() == s.get_last_lr()


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_kinds(name, cls):
    cfg = train_cfg(f"train.optimizer={name}", "train.weight_decay=0.05", "train.betas=[0.8,0.95]")
    opt = make_optimizer_factory(cfg)(nn.Linear(3, 2).parameters())
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == LR and group["weight_decay"] == 0.05
    if name == "sgd":
        assert group["momentum"] == 0.9 and group["nesterov"] is False
    else:
        assert group["betas"] == (0.8, 0.95)


def train_side_by_side(pairs, x: torch.Tensor, steps: int) -> None:
    """``steps`` optimizer steps of each (model, optimizer) pair on the same batch."""
    for _ in range(steps):
        for model, opt in pairs:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()


def test_sgd_nesterov_matches_torch():
    cfg = train_cfg("train.optimizer=sgd", "train.nesterov=true", "train.momentum=0.8", "train.weight_decay=0")
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ours = make_optimizer_factory(cfg)(a.parameters())
    ref = torch.optim.SGD(b.parameters(), lr=LR, momentum=0.8, nesterov=True)
    train_side_by_side(((a, ours), (b, ref)), torch.randn(8, 4), steps=3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_frozen_parameters_stay_out_of_the_optimizer():
    cfg = train_cfg("train.decay_norm_and_bias=false")
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model.parameters(), cfg)
    held = [id(p) for g in groups for p in g["params"]]
    assert id(model[0].weight) not in held and len(held) == 5


def _decay_split(model: nn.Module, cfg) -> tuple[set, set]:
    opt = make_optimizer_factory(cfg)(model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    skipped = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    return decayed, skipped


def test_decay_skips_biases_and_norm_weights():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 2))
    decayed, skipped = _decay_split(model, train_cfg("train.decay_norm_and_bias=false"))
    assert decayed == {"0.weight", "4.weight"}
    assert skipped == {"0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "4.bias"}
    # Default: one group, everything decayed (today's behaviour, and its checkpoints).
    assert len(make_optimizer_factory(train_cfg())(model.parameters()).param_groups) == 1
    # And AdamW really leaves the skipped ones alone: zero gradients, only the decay moves weights.
    cfg = train_cfg("train.decay_norm_and_bias=false", "train.weight_decay=0.5")
    lin = nn.Linear(3, 2)
    before = {n: p.detach().clone() for n, p in lin.named_parameters()}
    opt = make_optimizer_factory(cfg)(lin.parameters())
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(lin.bias, before["bias"])
    assert torch.allclose(lin.weight, before["weight"] * (1 - LR * 0.5))


def _fsdp_decay_groups(rank: int, world_size: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    fully_shard(model)
    cfg = train_cfg("train.decay_norm_and_bias=false", "train.weight_decay=0.5")
    decayed, skipped = _decay_split(model, cfg)
    assert decayed == {"0.weight", "2.weight"}, decayed
    assert skipped == {"0.bias", "1.weight", "1.bias", "2.bias"}, skipped
    opt = make_optimizer_factory(cfg)(model.parameters())
    for p in model.parameters():
        assert isinstance(p, DTensor)
        p.grad = torch.distributed.tensor.zeros(p.shape, device_mesh=p.device_mesh, placements=p.placements)
    opt.step()
    for name, p in model.named_parameters():
        full = p.full_tensor()
        expected = reference[name] * (1 - LR * 0.5) if name in decayed else reference[name]
        assert torch.allclose(full, expected), name


def test_decay_groups_on_fsdp_shards():
    """FSDP2 DTensor shards: ndim is the full parameter's, so both ranks group alike and the
    skipped parameters stay exactly as they were under AdamW's decoupled decay."""
    spawn(_fsdp_decay_groups, 2)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_cpu_optimizers_run_fused_adam_and_foreach_sgd(name):
    """torch's fused CPU kernel for adam/adamw (3-4x faster than foreach), foreach for sgd; the
    same updates as torch's default per-parameter loop (up to rounding: a fused kernel may
    contract to FMAs)."""
    cfg = train_cfg(f"train.optimizer={name}", "train.weight_decay=0.05")
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opt = make_optimizer_factory(cfg)(a.parameters())
    fused = name != "sgd"
    assert bool(opt.defaults.get("fused")) == fused and bool(opt.defaults.get("foreach")) != fused
    kinds = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    extra = {"momentum": cfg.momentum} if name == "sgd" else {}
    ref = kinds[name](b.parameters(), lr=LR, weight_decay=0.05, foreach=False, **extra)
    train_side_by_side(((a, opt), (b, ref)), torch.randn(8, 5), steps=4)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (name, (p - q).abs().max())


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_a_skipped_first_step_and_a_late_first_gradient_keep_the_weights_finite(name):
    """What torch's fused SGD gets wrong (why sgd stays on foreach): a first step skipped by the
    fp16 scaler's found-inf flag left its momentum buffers uninitialised (NaN weights next), and a
    parameter whose first gradient comes after the others' made it fail."""
    from dist_train.strategy.base import Precision

    cfg = train_cfg(f"train.optimizer={name}")
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "late": nn.Linear(4, 1)})
    opt = make_optimizer_factory(cfg)(model.parameters())
    precision = Precision("fp16", torch.device("cpu"))
    x = torch.randn(6, 4)
    for step in range(4):
        opt.zero_grad()
        out = model["body"](x).sum() * (float("inf") if step == 0 else 1.0)  # step 0 overflows
        if step >= 2:  # the head joins late
            out = out + model["late"](x).sum()
        precision.scale(out).backward()
        precision.unscale(opt)
        precision.optimizer_step(opt)
        assert all(torch.isfinite(p).all() for p in model.parameters()), (name, step)


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}])
def test_an_fp16_step_reads_one_flag_before_the_update_and_keeps_the_scale_on_the_device(impl):
    """Under fp16, Precision.optimizer_step reports the scaler's skips and scales as its
    get_scale() before and after the step would, without that host read after the update (it
    left a GPU idle while the loop fetched the next batch): the scale comes back as a tensor, this
    step's value, and the updates equal the scaler's own."""
    from dist_train.strategy.base import Precision

    torch.manual_seed(0)
    models = [nn.Linear(4, 2), nn.Linear(4, 2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, **impl) for m in models]
    ours, reference = Precision("fp16", torch.device("cpu")), torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    ours.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    ours.scaler.get_scale = lambda: pytest.fail("optimizer_step read the scale on the host")
    x = torch.randn(6, 4)
    scales, expected = [], []
    for step in range(6):
        overflow = float("inf") if step in (1, 4) else 1.0
        opts[0].zero_grad()
        ours.scale(models[0](x).square().sum() * overflow).backward()
        ours.unscale(opts[0])
        skipped, scale = ours.optimizer_step(opts[0])
        opts[1].zero_grad()
        reference.scale(models[1](x).square().sum() * overflow).backward()
        reference.unscale_(opts[1])
        before = reference.get_scale()
        reference.step(opts[1])
        reference.update()
        assert skipped == (reference.get_scale() < before) == (step in (1, 4)), step
        assert isinstance(scale, torch.Tensor)
        scales.append(scale)
        expected.append(reference.get_scale())
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(p, q) and torch.isfinite(p).all(), step
    assert [float(s) for s in scales] == expected and expected[1] == expected[0] / 2, expected
    # A disabled scaler keeps no scale: the step is applied, at scale 1.
    ours.scaler = torch.amp.GradScaler("cpu", enabled=False)
    opts[0].zero_grad()
    ours.scale(models[0](x).square().sum()).backward()
    ours.unscale(opts[0])
    assert ours.optimizer_step(opts[0]) == (False, 1.0)


def test_fused_only_on_a_fused_device(monkeypatch):
    from dist_train.train import optim

    params = [nn.Parameter(torch.zeros(3, device="meta")), nn.Parameter(torch.zeros(2, device="meta"))]
    assert optim.implementation([{"params": params}], "adamw") == {"foreach": True}  # meta: no fused kernel
    monkeypatch.setattr(optim, "FUSED_DEVICES", ("meta",))
    assert optim.implementation([{"params": params[:1]}, {"params": params[1:]}], "adamw") == {"fused": True}
    assert optim.implementation([{"params": params}], "adam") == {"fused": True}
    assert optim.implementation([{"params": params}], "sgd") == {"foreach": True}
    ints = [nn.Parameter(torch.zeros(2, device="meta", dtype=torch.int64), requires_grad=False)]
    assert optim.implementation([{"params": params + ints}], "adamw") == {"foreach": True}
    assert optim.implementation([{"params": []}], "adamw") == {"foreach": True}


def _fused_and_foreach_on_fsdp_shards(rank: int, world_size: int) -> None:
    """AdamW's fused kernel (torch has a CPU one too: let it count as a fused device here) and its
    foreach ops on FSDP's DTensor shards give a whole model's plain AdamW update."""
    from torch.distributed.fsdp import fully_shard

    from dist_train.train import optim

    cfg = train_cfg("train.weight_decay=0.1", "train.decay_norm_and_bias=false")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    reference = torch.optim.AdamW(param_groups(plain.parameters(), cfg), lr=LR, weight_decay=0.1, foreach=False)
    x = torch.randn(4, 6)
    for _ in range(3):
        reference.zero_grad()
        plain(x).square().mean().backward()
        reference.step()
    # Only the foreach path here (what DTensor shards on the CPU get): the CPU fused kernel as a
    # stand-in for CUDA's on DTensor shards aborted a worker (SIGABRT) once in two full-suite
    # runs; the fused path needs a GPU check.
    for fused_devices in (("cuda",),):
        optim.FUSED_SHARDED_DEVICES = fused_devices
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        fully_shard(model)
        opt = make_optimizer_factory(cfg)(model.parameters())
        assert bool(opt.defaults.get("fused")) == ("cpu" in fused_devices), opt.defaults
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            assert torch.allclose(p.full_tensor(), q, atol=1e-6), (fused_devices, name)
    # fp16 under FSDP: ShardedGradScaler's found-inf flag has shape [1], which the fused step
    # subtracts from its 0-d step counters and fails (seen on an H200): foreach even on a fused
    # device, and the scaled steps run.
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    optim.FUSED_SHARDED_DEVICES = ("cpu",)
    assert make_optimizer_factory(cfg)(model.parameters()).defaults.get("fused")  # bf16/fp32: fused
    opt = make_optimizer_factory(train_cfg("train.precision=fp16"))(model.parameters())
    assert opt.defaults.get("foreach") and not opt.defaults.get("fused"), opt.defaults
    sgd = make_optimizer_factory(train_cfg("train.optimizer=sgd"))(model.parameters())
    assert sgd.defaults.get("foreach") and not sgd.defaults.get("fused"), sgd.defaults  # (shards: adam/adamw only)
    optim.FUSED_SHARDED_DEVICES = ("cuda",)
    scaler = ShardedGradScaler("cpu")
    before = [p.full_tensor().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.unscale_(opt)  # as Strategy.step does, for clipping
        scaler.step(opt)
        scaler.update()
    assert all(not torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))


def test_fused_and_foreach_adamw_on_fsdp_shards():
    spawn(_fused_and_foreach_on_fsdp_shards, 2)


@pytest.mark.parametrize("overrides,key", [
    (["train.optimizer=rmsprop"], "train.optimizer"),
    (["train.schedule=poly"], "train.schedule"),
    (["train.nesterov=true", "train.momentum=0"], "train.nesterov"),
    (["train.nesterov=true"], "train.nesterov"),  # adamw by default
    (["train.step_size=0"], "train.step_size"),
    (["train.gamma=0"], "train.gamma"),
    (["train.gamma=1.5"], "train.gamma"),
    (["train.schedule=multistep"], "train.milestones"),
    (["train.milestones=[0,5]"], "train.milestones"),
])
def test_bad_optimizer_keys_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key


def test_lr_factor_accepts_any_section_object():
    """The factories read attributes only (the lead's Python API may pass its own objects)."""
    cfg = SimpleNamespace(schedule="step", warmup_steps=0, step_size=2, gamma=0.5, max_steps=10, min_lr_ratio=0.0)
    assert [lr_factor(s, cfg) for s in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


@pytest.mark.slow
def test_param_groups_and_schedule_survive_fsdp_and_deepspeed(tmp_path, ok):
    """Real jobs: SGD + Nesterov, a step schedule and no decay on biases and LayerNorm weights
    give single's losses under fsdp and DeepSpeed ZeRO-3 (2 ranks x 8 == 1 x 16), and the second
    param group really matters (decaying everything gives other losses)."""
    from tests.test_parity import COMMON as PARITY, TOL, run_cli_batch, series, worst

    args = [*PARITY, "train.optimizer=sgd", "train.nesterov=true", "train.lr=0.05", "train.weight_decay=0.5",
            "train.schedule=step", "train.step_size=3", "train.gamma=0.5"]
    ok(run_cli_batch([[*args, "strategy.name=single", "data.batch_size=16", "train.decay_norm_and_bias=false",
                       f"run.dir={tmp_path / 'single'}"],
                      [*args, "strategy.name=single", "data.batch_size=16", f"run.dir={tmp_path / 'decay_all'}"]],
                     nproc=0))
    ok(run_cli_batch([[*args, f"strategy.name={name}", *extra, "data.batch_size=8", "train.decay_norm_and_bias=false",
                       f"run.dir={tmp_path / name}"] for name, extra in (("fsdp", []), ("deepspeed", ["strategy.zero_stage=3"]))],
                     nproc=2))
    ref = series(tmp_path / "single", "loss")
    assert worst(series(tmp_path / "fsdp", "loss"), ref) < TOL
    assert worst(series(tmp_path / "deepspeed", "loss"), ref) < TOL
    assert worst(series(tmp_path / "decay_all", "loss"), ref) > 10 * TOL
    lrs_logged = series(tmp_path / "deepspeed", "lr")
    assert lrs_logged == series(tmp_path / "single", "lr")
    # Each step's record holds the learning rate its update used (as torch's StepLR hands it out),
    # not the one the schedule moved on to after it.
    cfg = load_config(None, args).train
    assert lrs_logged == {k: pytest.approx(0.05 * lr_factor(k - 1, cfg), rel=1e-9) for k in lrs_logged}



def test_lr_scale_gives_each_pattern_its_group_and_keeps_the_default_first():
    from dist_train.config import load_config
    from dist_train.config.schema import ConfigError
    from dist_train.train.optim import param_groups

    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(4, 4))
    model.add_module("norm", torch.nn.LayerNorm(4))
    model.add_module("head", torch.nn.Linear(4, 2))
    cfg = load_config(None, ["train.lr=0.1", "train.weight_decay=0.5", "train.decay_norm_and_bias=false",
                             "train.lr_scale={head.*: 10, 'norm.*': 0.5, '*': 0.1}"]).train
    groups = param_groups(model, cfg)
    ids = {id(p): n for n, p in model.named_parameters()}
    got = [(sorted(ids[id(p)] for p in g["params"]), g.get("lr"), g.get("weight_decay")) for g in groups]
    # first match wins ('*' takes the body: no parameter stays at train.lr, so no default group)
    assert got == [(["body.weight"], pytest.approx(0.01), None), (["head.weight"], pytest.approx(1.0), None),
                   (["body.bias"], pytest.approx(0.01), 0.0), (["norm.bias", "norm.weight"], 0.05, 0.0),
                   (["head.bias"], pytest.approx(1.0), 0.0)], got
    plain = load_config(None, ["train.lr_scale={head.*: 10}"]).train
    first, head = param_groups(model, plain)
    assert "lr" not in first and head["lr"] == pytest.approx(plain.lr * 10) and len(head["params"]) == 2
    with pytest.raises(ConfigError, match=r"train.lr_scale: 'fc\.\*' matches no trainable parameter; names look like body"):
        param_groups(model, load_config(None, ["train.lr_scale={fc.*: 10}"]).train)
    with pytest.raises(ConfigError, match="needs the parameters' names"):
        param_groups(model.parameters(), plain)


def _lr_scale_on(rank: int, world: int) -> None:
    from dist_train.config import load_config
    from dist_train.data.registry import DataInfo
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training
    from dist_train.train.step import train_step

    info = DataInfo("classification", (1, 8, 8), 10)
    g = torch.Generator().manual_seed(rank)
    batch = (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    for name in ("ddp", "fsdp", "deepspeed"):
        job = load_config(None, [f"strategy.name={name}", "model.name=mlp", "model.hidden=16", "data.name=digits",
                                 "train.optimizer=sgd", "train.momentum=0", "train.weight_decay=0", "train.lr=0.1",
                                 "train.warmup_steps=2", "train.schedule=constant", "train.grad_clip=0",
                                 "train.lr_scale={out.*: 10}"])
        torch.manual_seed(0)
        strategy = build_training(job, detect(), torch.device("cpu"), info)
        full = lambda: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().clone()
                        for k, v in strategy.unwrapped_model.state_dict().items()}
        before = full()
        # the gradient of the mean over both ranks' batches, by a plain module
        from dist_train.models import build_model

        ref = build_model(job.model, info)
        ref.load_state_dict(before)
        xs, ys = zip(*[(torch.randn(8, 1, 8, 8, generator=gr), torch.randint(0, 10, (8,), generator=gr))
                       for gr in (torch.Generator().manual_seed(r) for r in range(world))])
        torch.nn.functional.cross_entropy(ref(torch.cat(xs)), torch.cat(ys)).backward()
        train_step(strategy, iter([batch]), job.train)
        after = full()
        warm = 0.5  # (the first of 2 warmup steps: the schedule scales every group alike)
        for key, p in ref.named_parameters():
            lr = 0.1 * warm * (10 if key.startswith("out.") else 1)
            torch.testing.assert_close(after[key], before[key] - lr * p.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")
        lrs = [group["lr"] for group in strategy.optimizer.param_groups]
        assert len(lrs) == 2 and lrs[1] == pytest.approx(10 * lrs[0]), (name, lrs)  # (after the schedule's step)
        strategy.teardown()


@pytest.mark.slow
def test_lr_scale_trains_each_group_at_its_rate_under_every_strategy():
    spawn(_lr_scale_on, 2)


def test_an_own_optimizer_instance_is_rebuilt_with_every_group_setting_whatever_its_class():
    """fit(optimizer=instance): each torch.optim class is rebuilt over the module's parameters of the
    same names, with each group's settings (AdamW keeps decoupled_weight_decay in its defaults but
    its constructor does not take it: the first rebuild of AdamW failed on it); frozen parameters
    are left out, and LBFGS (a closure per step) is refused."""
    from dist_train.train.optim import GROUP_NAMES
    from dist_train.train.own_optim import OwnOptimizer

    def net():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))

    user, trained = net(), net()  # (the strategy's module: other parameter objects, the same names)
    classes = [c for c in vars(torch.optim).values() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
               and c not in (torch.optim.Optimizer, torch.optim.LBFGS, getattr(torch.optim, "Muon", None))]
    assert {torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop} <= set(classes)
    for cls in classes:
        given = cls([{"params": user[0].parameters(), "lr": 0.003}, {"params": user[1].parameters()}], lr=0.01)
        rebuilt = OwnOptimizer(given, user)(trained)
        assert type(rebuilt) is cls
        for old, new in zip(given.param_groups, rebuilt.param_groups, strict=True):
            assert {k: v for k, v in old.items() if k != "params"} == {k: v for k, v in new.items() if k != "params"}, cls
        assert [p for g in rebuilt.param_groups for p in g["params"]] == list(trained.parameters())
        assert getattr(rebuilt, GROUP_NAMES) == [["0.weight", "0.bias"], ["1.weight", "1.bias"]]
    trained[0].requires_grad_(False)
    rebuilt = OwnOptimizer(torch.optim.SGD(user.parameters(), lr=0.1), user)(trained)
    assert [p for g in rebuilt.param_groups for p in g["params"]] == list(trained[1].parameters())
    with pytest.raises(ConfigError, match="LBFGS steps with a closure"):
        OwnOptimizer(lambda model: torch.optim.LBFGS(model.parameters()))(trained)


def test_an_own_optimizer_takes_its_peak_rate_and_leaves_frozen_state_out():
    """A scheduler built over the user's optimizer before fit (LinearLR's warmup) had set each
    group's lr to its first value: the rebuild starts from the peak (initial_lr), for the run's
    schedule to take it from there. Adagrad makes its state in its constructor: a frozen
    parameter's entry was left behind and its state_dict() (every checkpoint) failed."""
    from dist_train.train.own_optim import OwnOptimizer

    def net():
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))

    user, trained = net(), net()
    given = torch.optim.SGD(user.parameters(), lr=0.1)
    sched.LinearLR(given, start_factor=0.1)
    assert given.param_groups[0]["lr"] == pytest.approx(0.01)
    assert OwnOptimizer(given, user)(trained).param_groups[0]["lr"] == 0.1
    trained[0].requires_grad_(False)
    adagrad = OwnOptimizer(torch.optim.Adagrad(user.parameters(), lr=0.1), user)(trained)
    assert set(adagrad.state) == set(trained[1].parameters())
    assert len(adagrad.state_dict()["state"]) == 2


def test_a_schedulers_state_comes_back_whole_from_meta_json():
    """MultiStepLR keeps its milestones in a Counter of int keys: through JSON they came back as
    strings and a resumed MultiStepLR never decayed again. encode_state/decode_state keep them."""
    import json

    from dist_train.strategy.base import decode_state, encode_state

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    s = sched.MultiStepLR(opt, milestones=[3, 6, 6], gamma=0.5)
    for _ in range(4):
        opt.step()
        s.step()
    state = s.state_dict()
    back = decode_state(json.loads(json.dumps(encode_state(state))))
    assert back == state and type(back["milestones"]) is type(state["milestones"])
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    s2 = sched.MultiStepLR(opt2, milestones=[1], gamma=0.5)
    s2.load_state_dict(back)
    lrs = []
    for _ in range(4):
        opt2.step()
        s2.step()
        lrs.append(opt2.param_groups[0]["lr"])
    # Epochs 5..8: MultiStepLR multiplies the optimizer's current rate (0.1 here) at each milestone
    # reached: twice at 6. (With the keys as strings no milestone was ever reached.)
    assert lrs == pytest.approx([0.1, 0.025, 0.025, 0.025])
    plain = {"last_epoch": 3, "base_lrs": [0.1], "_last_lr": [0.1]}  # (an older checkpoint's: unchanged)
    assert decode_state(json.loads(json.dumps(encode_state(plain)))) == plain == decode_state(plain)
