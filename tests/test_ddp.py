"""DDP on real 2-rank gloo groups: replicas stay identical, and the run equals one process."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import ok, spawn, train_losses  # noqa: F401  (ok is a fixture)
from test_parity import run_cli_batch

COMMON = ["data.name=digits", "model.name=mlp", "data.num_workers=0", "logging.every_steps=1",
          "train.max_steps=20", "train.warmup_steps=3", "eval.every_steps=0", "train.grad_clip=1.0",
          "checkpoint.resume=never", "logging.mlflow.enabled=false"]


def _ddp_replicas_identical(rank: int, world: int) -> None:
    from types import SimpleNamespace

    from dist_train.env.cluster import detect
    from dist_train.models import build_model
    from dist_train.train.build import build_training
    from dist_train.train.step import train_step
    from dist_train.config import load_config

    job = load_config(None, ["strategy.name=ddp", "model.name=cnn"])
    torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's weights
    info = SimpleNamespace(task="classification", input_shape=(1, 8, 8), num_classes=10, seq_len=None)
    strategy = build_training(job, detect(), torch.device("cpu"), info)
    gen = torch.Generator().manual_seed(rank)  # different data per rank
    data = iter([(torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))
                 for _ in range(6)])
    for _ in range(3):
        train_step(strategy, data, job.train)
    flat = torch.cat([p.detach().flatten() for p in strategy.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "DDP replicas diverged"
    moved = torch.cat([p.detach().flatten() for p in build_model(job.model, info).parameters()])
    assert not torch.equal(flat, moved)  # and they did train


def test_ddp_keeps_replicas_identical():
    spawn(_ddp_replicas_identical, 2)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.slow
def test_ddp_and_accumulation_equal_single_process(tmp_path, ok):
    """2 ranks x B == 1 process x 2B == 1 process x B x accumulation 2, step by step (fp32)."""
    B = 16
    runs = {
        "single_2B": ([f"data.batch_size={2 * B}", "strategy.name=single"], 0),
        "ddp_2xB": ([f"data.batch_size={B}", "strategy.name=ddp"], 2),
        "accum_2xB": ([f"data.batch_size={B}", "train.grad_accum_steps=2"], 0),
        "ddp_accum": ([f"data.batch_size={B // 2}", "train.grad_accum_steps=2", "strategy.name=ddp"], 2),
    }
    # One launch per kind: the single-process jobs in one process, the DDP jobs in one torchrun.
    for nproc in (0, 2):
        ok(run_cli_batch([[*COMMON, *args, f"run.dir={tmp_path / name}"] for name, (args, n) in runs.items()
                          if n == nproc], nproc=nproc, timeout=300))
    losses = {}
    for name in runs:
        losses[name] = train_losses(tmp_path / name)
        assert sorted(losses[name]) == list(range(1, 21))
    ref = losses["single_2B"]
    assert ref[20] < ref[1]  # it learns
    for name in ("ddp_2xB", "accum_2xB", "ddp_accum"):
        worst = max(_rel(losses[name][s], ref[s]) for s in ref)
        assert worst < 1e-4, f"{name}: worst relative loss difference {worst:.2e}"


@pytest.mark.slow
def test_per_module_gradient_norms_in_every_record_alike_under_ddp_and_fsdp(tmp_path):
    """logging.grad_norms=K: every record (logging steps, and a step evaluated off the logging
    cadence, which gets a record too) holds the K modules with the largest gradient norms, none
    above the global norm; under FSDP (each rank's shard squares, all-reduced) they equal DDP's."""
    from conftest import read_metrics

    base = ["data.name=digits", "model.name=mlp", "data.num_workers=0", "logging.every_steps=4", "eval.every_steps=3",
            "eval.max_batches=1", "train.max_steps=6", "logging.grad_norms=2", "checkpoint.resume=never",
            "checkpoint.every_steps=0", "logging.mlflow.enabled=false", "logging.progress_bar=off"]
    runs = {name: tmp_path / name for name in ("ddp", "fsdp")}
    out = run_cli_batch([[*base, f"strategy.name={name}", f"run.dir={d}"] for name, d in runs.items()], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    norms = {}
    for name, run_dir in runs.items():
        records = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
        assert sorted(records) == [3, 4, 6], (name, sorted(records))
        assert "eval_loss" in records[3], records[3]
        norms[name] = {step: {k: v for k, v in r.items() if k.startswith("grad_norm/")} for step, r in records.items()}
        for step, r in records.items():
            assert len(norms[name][step]) == 2, (name, step, r)
            assert all(0 < v <= r["grad_norm"] * (1 + 1e-6) for v in norms[name][step].values()), (name, step, r)
    for step, ddp in norms["ddp"].items():
        fsdp = norms["fsdp"][step]
        assert sorted(fsdp) == sorted(ddp), (step, ddp, fsdp)
        assert all(fsdp[k] == pytest.approx(v, rel=1e-4) for k, v in ddp.items()), (step, ddp, fsdp)
