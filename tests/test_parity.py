"""Parity: single, ddp, fsdp and DeepSpeed ZeRO 1/2/3 take the same optimizer steps.

fp32, same seed, same global batch (2 ranks x 8 == 1 process x 16; with accumulation 2 ranks x 4
x 2 micro-steps), clipping engaged (train.grad_clip below the gradient norm): per-step losses and
logged gradient norms must agree to a relative 1e-4. Every job is the real CLI (``cli.main``, what
``python -m dist_train`` runs) on real torchrun ranks; to save the ~10 s of imports per launch,
one torchrun runs the whole matrix, one job after another (see ``run_cli_batch``).

Run as a script, this file is that batch runner:
    torchrun --nproc_per_node=2 tests/test_parity.py PORTS ARGS... --- ARGS... [--- ...]
"""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, clean_env, free_port, read_metrics, spawn  # noqa: E402

SEP = "---"
TOL = 1e-4
CLIP = 0.5
STEPS = 10

TINY_GPT = ["data.name=shakespeare", "model.name=gpt", "model.gpt.n_layer=2", "model.gpt.n_head=2",
            "model.gpt.n_embd=32", "data.seq_len=32", "data.num_workers=0", "logging.every_steps=1",
            "eval.max_batches=1", "checkpoint.every_steps=0", "checkpoint.resume=never",
            "logging.mlflow.enabled=false", "logging.progress_bar=off", "run.seed=3"]
COMMON = [*TINY_GPT, f"train.max_steps={STEPS}", "train.warmup_steps=2", f"train.grad_clip={CLIP}",
          "train.precision=fp32"]

DISTRIBUTED = {
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],  # meta_init, reshard after forward: the defaults
    "fsdp_opts": ["strategy.name=fsdp", "strategy.fsdp.meta_init=false", "strategy.fsdp.reshard_after_forward=false",
                  "strategy.fsdp.activation_checkpointing=true"],
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
}


def run_cli_batch(jobs: Sequence[Sequence[str]], nproc: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run several CLI jobs in one launch: torchrun with ``nproc`` ranks, or one plain process (0)."""
    args: List[str] = []
    for job in jobs:
        args += [*job, SEP]
    ports = ",".join(str(free_port()) for _ in jobs)
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, ports, *args[:-1]]
    else:
        cmd = [sys.executable, __file__, ports, *args[:-1]]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _batch_main(argv: List[str]) -> int:
    from dist_train import cli

    ports, jobs = argv[0].split(","), [[]]
    for arg in argv[1:]:
        if arg == SEP:
            jobs.append([])
        else:
            jobs[-1].append(arg)
    for port, job in zip(ports, jobs):
        if "WORLD_SIZE" in os.environ:
            # A fresh rendezvous per job: rank 0 hosts its own store on a new port (torchrun's
            # agent store keeps the keys of the previous job's group).
            os.environ.update(MASTER_PORT=port, TORCHELASTIC_USE_AGENT_STORE="False")
        code = cli.main(job)
        if code:
            print(f"batch job failed with exit {code}: {' '.join(job)}", file=sys.stderr)
            return code
    return 0


def series(run_dir: Path, key: str) -> Dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def worst(a: Dict[int, float], b: Dict[int, float]) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(rel(a[s], b[s]) for s in b)


@pytest.mark.slow
def test_strategies_take_identical_steps(tmp_path, ok):
    """single == ddp == fsdp == ZeRO 1/2/3, with and without accumulation, clipping engaged."""
    dist_jobs, names = [], []
    for (name, args), accum in itertools.product(DISTRIBUTED.items(), (1, 2)):
        label = f"{name}_acc{accum}"
        names.append(label)
        dist_jobs.append([*COMMON, *args, f"data.batch_size={8 // accum}", f"train.grad_accum_steps={accum}",
                          f"run.dir={tmp_path / label}"])
    single_jobs = [[*COMMON, "strategy.name=single", "data.batch_size=16", f"run.dir={tmp_path / 'single_acc1'}"],
                   [*COMMON, "strategy.name=single", "data.batch_size=8", "train.grad_accum_steps=2",
                    f"run.dir={tmp_path / 'single_acc2'}"]]
    ok(run_cli_batch(single_jobs, nproc=0))
    ok(run_cli_batch(dist_jobs, nproc=2))
    names += ["single_acc2"]

    ref_loss, ref_norm = series(tmp_path / "single_acc1", "loss"), series(tmp_path / "single_acc1", "grad_norm")
    assert sorted(ref_loss) == list(range(1, STEPS + 1))
    assert ref_loss[STEPS] < ref_loss[1] - 0.1, "the reference run does not learn"
    # Clipping must really act, or a strategy that clipped wrongly (or not at all) would pass.
    assert min(ref_norm.values()) > 1.5 * CLIP, ref_norm

    runs = {"single_acc1": (ref_loss, ref_norm)}
    runs.update({n: (series(tmp_path / n, "loss"), series(tmp_path / n, "grad_norm")) for n in names})
    # Every pair, not only against single: the table shows each run against the reference and the
    # worst pair overall.
    table, failures, worst_pair = [], [], (0.0, "")
    for (a, (la, na)), (b, (lb, nb)) in itertools.combinations(runs.items(), 2):
        dl, dn = worst(la, lb), worst(na, nb)
        line = f"{b:>14} vs {a:<12} loss {dl:.1e}  grad_norm {dn:.1e}"
        if a == "single_acc1":
            table.append(line)
        worst_pair = max(worst_pair, (max(dl, dn), line))
        if not (dl < TOL and dn < TOL) or math.isnan(dl + dn):
            failures.append(line)
    print("\nworst relative difference over 10 steps:\n" + "\n".join(table) + f"\nworst pair: {worst_pair[1]}")
    assert not failures, "strategies disagree:\n" + "\n".join(failures)


@pytest.mark.slow
def test_bf16_trains_under_every_strategy(tmp_path, ok):
    """bf16 autocast (single, ddp, DeepSpeed) or FSDP's bf16 parameters: finite, and the loss falls."""
    base = [*TINY_GPT, "train.max_steps=15", "train.warmup_steps=2", "train.lr=3e-3", "train.precision=bf16"]
    ok(run_cli_batch([[*base, "strategy.name=single", "data.batch_size=16", f"run.dir={tmp_path / 'single'}"]], 0))
    ok(run_cli_batch([[*base, *args, "data.batch_size=8", f"run.dir={tmp_path / name}"]
                      for name, args in DISTRIBUTED.items() if name != "fsdp_opts"], nproc=2))
    for name in ["single", *(n for n in DISTRIBUTED if n != "fsdp_opts")]:
        loss, norm = series(tmp_path / name, "loss"), series(tmp_path / name, "grad_norm")
        assert sorted(loss) == list(range(1, 16)), name
        assert all(math.isfinite(v) for v in [*loss.values(), *norm.values()]), (name, loss, norm)
        assert loss[15] < 0.9 * loss[1], f"{name}: bf16 loss did not fall: {loss}"



@pytest.mark.slow
def test_bf16_with_batchnorm_resumes_to_the_uninterrupted_runs_evaluation(tmp_path, ok):
    """A ResNet's BatchNorm under bf16: FSDP's and DeepSpeed's bf16 cast its weights while its running
    statistics stayed fp32, and batch_norm refused the mix at the first forward. FSDP keeps it in an
    fp32 unit (as autocast does), DeepSpeed reads its weights as fp32 for the normalisation (its
    statistics stay fp32); both train, save, and resume from that checkpoint.

    Each rank updates the running statistics from its own batches: a checkpoint kept whichever
    rank's copy DCP chose and each rank evaluated with its own, so a run stopped and resumed
    evaluated otherwise than an uninterrupted one (ddp 18.1566 vs 18.1766, found by a review).
    Every save, evaluation and hand-back now sees rank 0's, under every strategy."""
    base = ["model.name=resnet18", "data.name=synthetic_images", "data.synthetic_samples=64", "data.resize=8",
            "data.batch_size=2", "data.num_workers=0", "train.precision=bf16", "train.warmup_steps=0",
            "train.schedule=constant",  # (a run stopped at 2 of 2 steps followed a shorter schedule)
            "logging.every_steps=1", "logging.mlflow.enabled=false", "logging.progress_bar=off", "eval.max_batches=2",
            "checkpoint.every_steps=2"]
    cases = {"ddp": ["strategy.name=ddp"], "fsdp": ["strategy.name=fsdp"],
             "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"]}
    ok(run_cli_batch([[*base, *args, f"train.max_steps={steps}", f"run.dir={tmp_path / name / kind}"]
                      for name, args in cases.items() for kind, steps in (("straight", 3), ("stopped", 2))], nproc=2))
    ok(run_cli_batch([[*base, *args, "train.max_steps=3", f"run.dir={tmp_path / name / 'stopped'}"]
                      for name, args in cases.items()], nproc=2))
    for name in cases:
        straight, resumed = (json.loads((tmp_path / name / kind / "summary.json").read_text())
                             for kind in ("straight", "stopped"))
        assert resumed["status"] == "completed" and resumed["steps"] == 3 and resumed["resumed_from_step"] == 2, resumed
        assert all(math.isfinite(v) for v in series(tmp_path / name / "stopped", "loss").values()), name
        assert series(tmp_path / name / "stopped", "loss")[3] == series(tmp_path / name / "straight", "loss")[3], name
        assert resumed["eval_loss"] == straight["eval_loss"], (name, resumed["eval_loss"], straight["eval_loss"])


def _deepspeed_bf16_batchnorm_with_cast_statistics(rank: int, world_size: int) -> None:
    from types import SimpleNamespace

    from dist_train.config import load_config
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training
    from dist_train.train.step import train_step

    # A user's data_types.buffer_dtype casts the statistics with the weights, as DeepSpeed releases
    # before that key did for every module: the forward then reads the weights in their dtype.
    job = load_config(None, ["strategy.name=deepspeed", "strategy.zero_stage=2", "train.precision=bf16",
                             "train.warmup_steps=0", "train.grad_clip=0",
                             "strategy.deepspeed.config={data_types: {buffer_dtype: bf16}}"])
    info = SimpleNamespace(task="classification", input_shape=(4,), num_classes=2)
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    strategy = build_training(job, detect(), torch.device("cpu"), info, model=lambda: net)
    try:
        train_step(strategy, iter([(torch.randn(8, 4), torch.randint(0, 2, (8,)))]), job.train)
        assert strategy.unwrapped_model[0].running_mean.dtype == torch.bfloat16
    finally:
        strategy.teardown()


def test_batchnorm_statistics_cast_by_the_engine_are_put_back_or_followed():
    from dist_train.strategy.deepspeed import _keep_fp32, _norm_statistics_in

    bn = torch.nn.BatchNorm1d(4)
    bn.running_mean.data = torch.tensor([0.1234567, 1.0, -2.0, 3.3333333])
    kept = _norm_statistics_in(torch.nn.Sequential(bn), torch.bfloat16)
    bn.bfloat16()  # (an older engine's cast: parameters and buffers)
    _keep_fp32(kept)
    assert bn.running_mean.dtype == torch.float32 and bn.running_mean[0].item() == pytest.approx(0.1234567, abs=1e-7)
    assert bn.weight.dtype == torch.bfloat16 and bn(torch.randn(8, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    spawn(_deepspeed_bf16_batchnorm_with_cast_statistics, 1)


def _deepspeed_bf16_batchnorm_statistics(rank: int, world_size: int) -> None:
    from types import SimpleNamespace

    from dist_train.config import load_config
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training
    from dist_train.train.step import train_step

    job = load_config(None, ["strategy.name=deepspeed", "strategy.zero_stage=2", "train.precision=bf16",
                             "train.warmup_steps=0", "train.schedule=constant", "train.grad_clip=0"])
    info = SimpleNamespace(task="classification", input_shape=(4,), num_classes=2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    strategy = build_training(job, detect(), torch.device("cpu"), info, model=lambda: net)
    try:
        x = torch.randn(8, 4) * 3 + 5
        for _ in range(2):
            train_step(strategy, iter([(x, torch.randint(0, 2, (8,)))]), job.train)
        bn = strategy.unwrapped_model[0]
        assert bn.weight.dtype == torch.bfloat16  # (the engine's cast)
        assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
        seen = x.bfloat16().float()  # (the input reaches the engine's module in bf16)
        mean, var = seen.mean(0), seen.var(0)  # (batch_norm's running variance: unbiased)
        torch.testing.assert_close(bn.running_mean, 0.19 * mean, rtol=1e-5, atol=1e-6)  # two momentum 0.1 updates
        torch.testing.assert_close(bn.running_var, 0.81 + 0.19 * var, rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 2
        bn.eval()  # the running statistics normalise a bf16 input in eval mode as well
        assert torch.isfinite(strategy.unwrapped_model(x.bfloat16()).float()).all()
    finally:
        strategy.teardown()


def test_deepspeed_bf16_keeps_batchnorm_statistics_in_fp32():
    """DeepSpeed's bf16 section casts every parameter; BatchNorm's running statistics were kept in
    bf16 with them (batch_norm refuses bf16 weights with fp32 statistics), so each momentum update
    kept 3 significant digits: a running variance near 1 moved in steps of 1/128. They now stay
    fp32 and take the exact update, as under autocast."""
    spawn(_deepspeed_bf16_batchnorm_statistics, 1)


if __name__ == "__main__":
    sys.exit(_batch_main(sys.argv[1:]))
