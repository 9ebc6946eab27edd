"""``train.compile=true``: single, ddp and fsdp (2 gloo ranks) train compiled and take the same
steps as eager, and so does DeepSpeed ZeRO-2; a checkpoint saved compiled resumes eager
(parameter names never get torch.compile's ``_orig_mod.`` prefix).

Every job is the real CLI on real torchrun ranks, several jobs per launch (``test_parity``'s batch
runner). Compiling on a 2-core CPU takes tens of seconds per graph, so the model is the small
``mlp`` on ``digits`` and the runs are a handful of steps.

Run as a script, this file is that batch runner:
    torchrun --nproc_per_node=2 tests/test_compile.py PORTS ARGS... --- ARGS... [--- ...]
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, clean_env, free_port  # noqa: E402
from test_parity import SEP, series, worst  # noqa: E402

STEPS = 6
# Inductor reorders floating-point sums (fused kernels): a few ulps per step, amplified by Adam.
TOL = 1e-3
TINY = ["data.name=digits", "model.name=mlp", "model.hidden=32", "model.dropout=0.0", "data.batch_size=16",
        "data.num_workers=0", f"train.max_steps={STEPS}", "train.warmup_steps=1", "train.lr=0.01",
        "logging.every_steps=1", "eval.every_steps=0", "eval.max_batches=1", "checkpoint.every_steps=3",
        "checkpoint.resume=never", "logging.mlflow.enabled=false", "logging.progress_bar=off", "run.seed=5"]


def run_batch(jobs: Sequence[Sequence[str]], nproc: int, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run CLI jobs one after another in one launch of this file (torchrun ranks, or one process)."""
    args: List[str] = []
    for job in jobs:
        args += [*job, SEP]
    ports = ",".join(str(free_port()) for _ in jobs)
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                     f"--master_port={free_port()}"]
    return subprocess.run([*launcher, __file__, ports, *args[:-1]], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _compiled_and_eager(tmp_path: Path, name: str, extra: Sequence[str]) -> tuple:
    compiled, eager = tmp_path / f"{name}_compiled", tmp_path / f"{name}_eager"
    jobs = [[*TINY, *extra, "train.compile=true", f"run.dir={compiled}"],
            [*TINY, *extra, "train.compile=false", f"run.dir={eager}"]]
    return jobs, compiled, eager


def _assert_same_steps(compiled: Path, eager: Path) -> None:
    lc, le = series(compiled, "loss"), series(eager, "loss")
    assert sorted(le) == list(range(1, STEPS + 1)), le
    assert le[STEPS] < le[1], f"the eager run does not learn: {le}"
    diff = worst(lc, le)
    print(f"{compiled.name}: worst relative loss difference to eager over {STEPS} steps: {diff:.1e}")
    assert diff < TOL, (lc, le)


def _compiled_graphs(run_dir: Path) -> List[int]:
    """Graphs TorchDynamo compiled during the job of ``run_dir``, on each rank (see ``_batch_main``)."""
    return [int(f.read_text()) for f in sorted(run_dir.glob("compiled_graphs.rank*"))]


@pytest.mark.slow
def test_single_compiled_matches_eager(tmp_path, ok):
    jobs, compiled, eager = _compiled_and_eager(tmp_path, "single", ["strategy.name=single"])
    ok(run_batch(jobs, nproc=0))
    graphs = _compiled_graphs(compiled), _compiled_graphs(eager)
    assert graphs[0][0] > 0 and graphs[1] == [0], f"graphs compiled by the compiled job, then by the eager one: {graphs}"
    _assert_same_steps(compiled, eager)


@pytest.mark.slow
def test_ddp_fsdp_deepspeed_compiled_match_eager_and_resume_eager(tmp_path, ok):
    """2 ranks. FSDP compiles its blocks: the checkpoint it saves at step 3 holds the plain
    parameter names, and an eager FSDP job (and an eager DDP job: checkpoints move between the
    torch-native strategies) resumes from it and takes the compiled run's steps 4..6. DeepSpeed
    ZeRO-2 compiles its engine's module."""
    jobs, pairs = [], []
    for name, extra in (("ddp", ["strategy.name=ddp"]), ("fsdp", ["strategy.name=fsdp"]),
                        ("zero2", ["strategy.name=deepspeed", "strategy.zero_stage=2"])):
        pair, compiled, eager = _compiled_and_eager(tmp_path, name, extra)
        jobs += pair
        pairs.append((compiled, eager))
    step3 = tmp_path / "fsdp_compiled" / "checkpoints" / "step_00000003"
    jobs += [[*TINY, f"strategy.name={name}", f"checkpoint.resume={step3}", f"run.dir={tmp_path / name}_resumed"]
             for name in ("fsdp", "ddp")]
    ok(run_batch(jobs, nproc=2))
    for compiled, eager in pairs:
        graphs = _compiled_graphs(compiled), _compiled_graphs(eager)
        assert len(graphs[0]) == 2 and min(graphs[0]) > 0 and graphs[1] == [0, 0], (compiled.name, graphs)
        _assert_same_steps(compiled, eager)
    assert all(_compiled_graphs(tmp_path / f"{name}_resumed") == [0, 0] for name in ("fsdp", "ddp"))

    from dist_train.checkpoint import storage

    names = sorted(storage.tensor_shapes(str(step3 / "dcp")))
    assert "hidden1.linear.weight" in names and not any("_orig_mod" in n for n in names), names
    fsdp_losses = series(tmp_path / "fsdp_compiled", "loss")
    for name in ("fsdp", "ddp"):
        resumed_losses = series(tmp_path / f"{name}_resumed", "loss")
        assert sorted(resumed_losses) == [4, 5, 6], resumed_losses
        assert worst(resumed_losses, {s: fsdp_losses[s] for s in (4, 5, 6)}) < TOL, (name, resumed_losses, fsdp_losses)


def _batch_main(argv: List[str]) -> int:
    """``test_parity``'s batch runner, with ``train.compile`` handed to the strategy the way the job
    builder does (``strategy.compile = job.train.compile`` before ``setup``), and the number of
    graphs TorchDynamo compiled during each job written to ``<run.dir>/compiled_graphs.rank<N>``."""
    import torch._dynamo

    import test_parity
    from dist_train.train import build

    build_training = build.build_training

    def with_compile(job, *args, **kwargs):
        make_strategy = build.build_strategy

        def make(*a, **k):
            strategy = make_strategy(*a, **k)
            strategy.compile = job.train.compile
            return strategy

        build.build_strategy = make
        try:
            return build_training(job, *args, **kwargs)
        finally:
            build.build_strategy = make_strategy

    build.build_training = with_compile
    from dist_train import cli

    main, stats = cli.main, torch._dynamo.utils.counters["stats"]

    def main_and_count(job):
        torch._dynamo.reset()  # a job may not reuse the graphs of the one before: it compiles its own
        before = stats["unique_graphs"]
        code = main(job)
        run_dir = Path(next(arg for arg in job if arg.startswith("run.dir=")).partition("=")[2])
        (run_dir / f"compiled_graphs.rank{os.environ.get('RANK', '0')}").write_text(
            str(stats["unique_graphs"] - before))
        return code

    cli.main = main_and_count
    return test_parity._batch_main(argv)


if __name__ == "__main__":
    sys.exit(_batch_main(sys.argv[1:]))
