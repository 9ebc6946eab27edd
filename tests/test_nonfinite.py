"""train.nonfinite: a NaN in one rank's batch is seen by every rank, and skip / abort / rollback
act alike everywhere (2 gloo ranks, real torchrun jobs)."""
from __future__ import annotations

import json
import math

import pytest

from conftest import ok, read_metrics, read_summary, run_cli  # noqa: F401
from dist_train.checkpoint import layout

BASE = ["model.name=mlp", "data.name=digits", "data.batch_size=16", "data.num_workers=0", "train.max_steps=10",
        "train.warmup_steps=0", "logging.every_steps=1", "logging.mlflow.enabled=false", "logging.progress_bar=off",
        "checkpoint.resume=never", "eval.max_batches=1"]


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


# DeepSpeed's engine drops a non-finite global norm itself; with bf16.check_grad_overflow off it
# would not, and the loop's own agreed loss check (NonFiniteGuard.veto) must do it instead.
_DS_VETO = ["train.precision=bf16", "strategy.deepspeed.config.bf16.check_grad_overflow=false"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed", "deepspeed-veto"])
def test_skip_drops_the_bad_update_on_every_rank(strategy, tmp_path, ok):
    run = tmp_path / strategy
    extra = _DS_VETO if strategy == "deepspeed-veto" else []
    ok(run_cli([*BASE, f"strategy.name={strategy.split('-')[0]}", "train.nonfinite=skip", "debug.faults=nan@4:1",
                *extra, f"run.dir={run}"], nproc=2))
    s = read_summary(run)
    assert s["status"] == "completed" and s["steps"] == 10
    records = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert records[4]["loss"] is None or not math.isfinite(records[4]["loss"])  # the mean over ranks saw it
    assert all(math.isfinite(records[k]["loss"]) for k in range(5, 11))  # and the weights stayed finite
    assert records[10]["nonfinite_steps"] == 1


@pytest.mark.slow
def test_abort_checkpoints_the_last_good_state_and_names_the_step(tmp_path):
    run = tmp_path / "abort"
    proc = run_cli([*BASE, "strategy.name=ddp", "debug.faults=nan@4:1", f"run.dir={run}"], nproc=2)
    assert proc.returncode not in (0, 2, 3)
    assert "step 4: non-finite loss or gradient" in proc.stderr
    ckpt = run / "checkpoints" / "step_00000004"
    assert layout.verify(str(ckpt)) == []
    from dist_train.checkpoint import storage

    weights = storage.load_full_model(str(ckpt / "dcp"))
    assert all(bool(t.isfinite().all()) for t in weights.values() if t.is_floating_point())
    assert read_summary(run)["status"] == "failed"


@pytest.mark.slow
def test_rollback_reloads_the_last_checkpoint_and_continues_past_the_bad_batches(tmp_path, ok):
    run = tmp_path / "rollback"
    proc = ok(run_cli([*BASE, "strategy.name=fsdp", "train.nonfinite=rollback", "train.nonfinite_patience=2",
                       "checkpoint.every_steps=3", "debug.faults=nan@5:1,nan@6:1", f"run.dir={run}"], nproc=2))
    assert "rolled back to step_00000003" in proc.stderr
    s = read_summary(run)
    assert s["status"] == "completed" and s["steps"] == 10
    got = losses(run)
    assert sorted(got) == list(range(1, 11)) and all(math.isfinite(v) for v in got.values())
    # The steps after the rollback trained on later batches than the first attempt at them.
    assert s["samples_seen"] == (10 + 3) * 32  # 6 steps, back to 3, 7 more
    meta = json.loads((run / "checkpoints/step_00000006/meta.json").read_text())
    assert meta["train_state"]["position"] > 6 * 32 or meta["train_state"]["epoch"] > 0


@pytest.mark.parametrize("dtypes", [("float32",) * 3, ("bfloat16",) * 3, ("float32", "bfloat16", "float32")])
def test_total_norm_equals_torch_get_total_norm_bit_for_bit(dtypes):
    """The norm the non-finite check and the logs read: torch's value, through the one-group fast
    path (one dtype, one device) and through torch's own grouping (mixed dtypes)."""
    import torch

    from dist_train.strategy.base import total_norm

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen).to(getattr(torch, d))
               for shape, d in zip([(7, 5), (5,), (3, 2, 4)], dtypes)]
    expected = torch.nn.utils.get_total_norm(tensors, norm_type=2.0)
    got = total_norm(tensors)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    tensors[1][2] = float("nan")
    assert math.isnan(total_norm(tensors).item())
    tensors[1][2] = float("inf")
    assert math.isinf(total_norm(tensors).item())


def test_the_counts_of_skipped_and_nonfinite_steps_survive_a_resume(tmp_path):
    """skipped_steps and nonfinite_steps are the run's counts: checkpointed, so a crash and resume
    logs what an uninterrupted run logs (they restarted from 0 in the resumed process)."""
    run = tmp_path / "run"
    args = [*BASE, "train.nonfinite=skip", "checkpoint.every_steps=5", "checkpoint.resume=auto", f"run.dir={run}"]
    crashed = run_cli([*args, "debug.faults=nan@3,crash@8"])
    assert crashed.returncode not in (0, 2), crashed.stderr[-2000:]
    again = run_cli([*args, "debug.faults=nan@3"])
    assert again.returncode == 0, again.stderr[-3000:]
    summary = read_summary(run)
    assert summary["resumed_from_step"] == 5 and summary["skipped_steps"] == summary["nonfinite_steps"] == 1
    records = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert [records[k]["skipped_steps"] for k in (2, 3, 6, 10)] == [0, 1, 1, 1], records
    assert [records[k]["nonfinite_steps"] for k in (3, 6, 10)] == [1, 1, 1], records
