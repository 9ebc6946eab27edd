"""Sharding is real: what each rank stores of the parameters and optimizer state (2-rank gloo group).

Bytes are counted from the tensors' storages (each storage once), after one optimizer step so
that AdamW's moments exist: a DTensor's ``to_local()``, a ZeRO-3 parameter's ``ds_tensor``
partition, DeepSpeed's fp32 master partitions and its base optimizer's state. Not timing, not RSS.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import spawn  # noqa: E402

CASES = {
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    # ZeRO-3 keeps parameters under 1e5 elements whole on every rank ("persistent", to spare
    # tiny all-gathers): all of this small model's. Threshold 0 partitions every one.
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3",
              "strategy.deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0"],
}


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _held_bytes(strategy) -> dict:
    """This rank's bytes of parameters, optimizer moments and (DeepSpeed) fp32 master partitions."""
    model = strategy.unwrapped_model
    params = [_local(p) for p in model.parameters()]  # a ZeRO-3 parameter's own data is empty unless gathered
    params += [p.ds_tensor for p in model.parameters() if hasattr(p, "ds_tensor")]
    optimizer = getattr(strategy.optimizer, "optimizer", strategy.optimizer)  # DeepSpeed wraps ours
    moments = [_local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    masters = []
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        masters += list(getattr(strategy.optimizer, attr, None) or [])
    return {"params": _nbytes(params), "moments": _nbytes(moments), "masters": _nbytes(masters),
            "resident_params": sum(_local(p).numel() for p in model.parameters())}


def _measure(rank: int, world: int, out: dict) -> None:
    from dist_train.config import load_config
    from dist_train.env.cluster import detect
    from dist_train.models import build_model, count_parameters
    from dist_train.train.build import build_training
    from dist_train.train.step import train_step

    info = SimpleNamespace(task="language_model", input_shape=(16,), num_classes=256, seq_len=16)
    for name, overrides in CASES.items():
        job = load_config(None, [*overrides, "model.name=gpt", "data.name=shakespeare", "model.gpt.n_layer=2",
                                 "model.gpt.n_embd=64", "model.gpt.n_head=2", "data.batch_size=4"])
        with torch.device("meta"):
            full = count_parameters(build_model(job.model, info)) * 4  # fp32 bytes of the whole model
        torch.manual_seed(0)
        strategy = build_training(job, detect(), torch.device("cpu"), info)
        if name == "fsdp":
            _check_meta_init_is_exact(strategy, job, info)
        gen = torch.Generator().manual_seed(rank)
        batch = (torch.randint(0, 256, (4, 16), generator=gen), torch.randint(0, 256, (4, 16), generator=gen))
        train_step(strategy, iter([batch]), job.train)
        held = _held_bytes(strategy)
        strategy.teardown()
        if rank == 0:
            out[name] = {**held, "full": full}


def _check_meta_init_is_exact(strategy, job, info) -> None:
    """meta_init (the default) shards a meta-device model and fills the shards itself: the full
    weights must equal a plain CPU build's bit for bit, and the RNG must end where that build leaves it."""
    from dist_train.models import build_model

    assert job.strategy.fsdp.meta_init
    rng_after = torch.get_rng_state()
    torch.manual_seed(0)
    plain = build_model(job.model, info)
    assert torch.equal(rng_after, torch.get_rng_state()), "meta_init leaves the RNG elsewhere than a plain build"
    sharded = dict(strategy.model.named_parameters())
    for name, p in plain.named_parameters():
        assert _local(sharded[name]).numel() < p.numel(), f"{name} is not sharded"
        assert torch.equal(sharded[name].full_tensor(), p), f"meta_init changed the initial value of {name}"


def _check(rank: int, world: int) -> None:
    results: dict = {}
    _measure(rank, world, results)
    if rank != 0:
        return
    full = results["ddp"]["full"]
    share = full / world

    def near(value: float, target: float, what: str) -> None:
        # Shards are padded to even splits and alignments: allow 5%.
        assert abs(value - target) <= 0.05 * target, f"{what}: {value} bytes, expected about {target:.0f}"

    ddp = results["ddp"]
    near(ddp["params"], full, "ddp params")
    near(ddp["moments"], 2 * full, "ddp AdamW moments")
    ddp_total = ddp["params"] + ddp["moments"]
    print("\nbytes per rank (params, AdamW moments, DeepSpeed fp32 masters) vs ddp total", ddp_total)
    for name, r in results.items():
        total = r["params"] + r["moments"] + r["masters"]
        print(f"  {name:6} params {r['params']:>8} moments {r['moments']:>8} masters {r['masters']:>8} "
              f"total {total:>8} = {total / ddp_total:.2f} x ddp")

    fsdp = results["fsdp"]
    near(fsdp["params"], share, "fsdp local parameter shards")
    near(fsdp["moments"], 2 * share, "fsdp AdamW moments")
    near(fsdp["params"] + fsdp["moments"], ddp_total / world, "fsdp params + optimizer state")

    zero3 = results["zero3"]
    assert zero3["resident_params"] == 0, "ZeRO-3 keeps whole parameters resident outside forward"
    near(zero3["params"], share, "zero3 parameter partitions")
    near(zero3["moments"], 2 * share, "zero3 AdamW moments")
    near(zero3["masters"], share, "zero3 fp32 master partition")
    # DeepSpeed keeps an fp32 master partition besides the parameter partition (redundant in fp32
    # training, the bf16/fp16 master otherwise): 1/world of (ddp's state + that one extra copy).
    near(zero3["params"] + zero3["moments"] + zero3["masters"], (ddp_total + full) / world, "zero3 total")

    for name in ("zero1", "zero2"):
        r = results[name]
        near(r["params"], full, f"{name} parameters (replicated)")
        near(r["moments"], 2 * share, f"{name} AdamW moments")
        near(r["masters"], share, f"{name} fp32 master partition")


def test_fsdp_and_zero_shard_parameters_and_optimizer_state():
    spawn(_check, 2)


REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter")


def _count_reductions(rank: int, world: int, counts: dict) -> None:
    """Reduction collectives per optimizer step, with 1 and with 2 micro-steps of accumulation."""
    import torch.distributed as dist

    from dist_train.config import load_config
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training
    from dist_train.train.step import train_step

    calls = {"n": 0}

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in REDUCTIONS:  # patched before any engine captures a reference
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))
    info = SimpleNamespace(task="language_model", input_shape=(16,), num_classes=256, seq_len=16)
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.randint(0, 256, (4, 16), generator=gen), torch.randint(0, 256, (4, 16), generator=gen))
               for _ in range(3)]
    for name in ("fsdp", "zero1"):
        for accum in (1, 2):
            job = load_config(None, [*CASES[name], "model.name=gpt", "data.name=shakespeare", "model.gpt.n_layer=2",
                                     "model.gpt.n_embd=32", "model.gpt.n_head=2", f"train.grad_accum_steps={accum}",
                                     "data.batch_size=4"])
            strategy = build_training(job, detect(), torch.device("cpu"), info)
            train_step(strategy, iter(batches), job.train)  # warm-up: lazy init, optimizer state
            before = calls["n"]
            train_step(strategy, iter(batches), job.train)
            counts[(name, accum)] = calls["n"] - before
            strategy.teardown()


def _check_accumulation(rank: int, world: int) -> None:
    counts: dict = {}
    _count_reductions(rank, world, counts)
    for name in ("fsdp", "zero1"):
        one, two = counts[(name, 1)], counts[(name, 2)]
        assert one > 0, f"{name}: no reduction counted at all ({counts})"
        assert two == one, (f"{name}: {two} reductions with 2 micro-steps, {one} with 1: the non-final "
                            f"micro-step must not reduce gradients")


def test_accumulation_reduces_gradients_only_on_the_last_micro_step():
    """FSDP (set_requires_gradient_sync) and ZeRO-1 (the engine's boundary flag) reduce once per step."""
    spawn(_check_accumulation, 2)
