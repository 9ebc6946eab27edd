"""A run stopped and resumed continues as an uninterrupted one would (found by a review of users'
habits): the learning rate of the first resumed step follows this run's schedule (a longer
``train.max_steps`` stretches linear and cosine), and an evaluation that draws random numbers in
the training process (``data.num_workers=0``) does not move the training streams."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import dist_train
from conftest import spawn

COMMON = ["logging.mlflow.enabled=false", "data.num_workers=0", "logging.every_steps=1", "data.batch_size=8",
          "checkpoint.every_steps=0"]


class _Noisy(Dataset):
    """Items with noise drawn from torch's global generator (an augmentation of the user's own)."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 6, generator=g) + self.y[:, None].float()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(6), self.y[i]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _fit(run_dir, steps, extra=()):
    model = _net()
    summary = dist_train.fit(model, _Noisy(96, 0), eval_data=_Noisy(24, 1), task="classification",
                             overrides=[*COMMON, f"run.dir={run_dir}", f"train.max_steps={steps}", *extra])
    assert summary["status"] == "completed", summary
    records = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return model, {r["step"]: r for r in records if "lr" in r}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_resume_with_a_longer_schedule_uses_its_learning_rate_from_the_first_step(tmp_path, schedule):
    extra = [f"train.schedule={schedule}", "train.warmup_steps=2", "train.min_lr_ratio=0"]
    _model, straight = _fit(tmp_path / "straight", 12, extra)
    _fit(tmp_path / "stopped", 6, extra)
    _model, resumed = _fit(tmp_path / "stopped", 12, extra)
    for step in range(7, 13):
        assert resumed[step]["lr"] == pytest.approx(straight[step]["lr"], rel=1e-9), (step, resumed[step], straight[step])


def test_an_evaluation_drawing_random_numbers_does_not_move_the_training_streams(tmp_path):
    # 6 steps, the end-of-run evaluation and checkpoint, then 6 more: the same weights as 12 at once.
    straight, _ = _fit(tmp_path / "straight", 12)
    _fit(tmp_path / "stopped", 6)
    resumed, _ = _fit(tmp_path / "stopped", 12)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_when_no_checkpoint_verifies_the_run_stops_and_moves_nothing(tmp_path):
    """Damage found before loading (here meta.json) in every checkpoint of the run: auto used to
    start from scratch with exit 0 and rewrite the run's history; it stops instead, naming what
    to do, and leaves the checkpoints where they are (a read error that has passed: a rerun resumes)."""
    from conftest import read_summary, run_cli

    run = tmp_path / "run"
    args = ["model.name=mlp", "data.name=digits", "model.hidden=16", "logging.mlflow.enabled=false",
            "checkpoint.every_steps=5", f"run.dir={run}"]
    assert run_cli([*args, "train.max_steps=5"]).returncode == 0
    meta = run / "checkpoints" / "step_00000005" / "meta.json"
    good = meta.read_bytes()
    meta.write_bytes(good[:-3] + b"  \n")  # same size, other bytes: only the checksum tells
    proc = run_cli([*args, "train.max_steps=10"])
    summary = read_summary(run)
    assert proc.returncode == 1 and summary["status"] == "failed", (proc.returncode, summary)
    assert "no checkpoint under" in summary["error"] and "checkpoint.resume=never" in summary["error"], summary
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000005"]
    meta.write_bytes(good)  # (the storage problem passed)
    assert run_cli([*args, "train.max_steps=10"]).returncode == 0
    assert read_summary(run)["resumed_from_step"] == 5


def test_a_rerun_killed_before_it_ends_leaves_no_earlier_summary(tmp_path):
    """summary.json is the outcome of the run's newest attempt: a rerun that dies without writing
    one (SIGKILL, the OOM killer; here a crash fault, a hard exit) leaves none, not the finished
    attempt's "completed" that a requeue script would believe."""
    from conftest import read_summary, run_cli

    run = tmp_path / "run"
    args = ["model.name=mlp", "data.name=digits", "model.hidden=16", "logging.mlflow.enabled=false", f"run.dir={run}"]
    assert run_cli([*args, "train.max_steps=4"]).returncode == 0 and read_summary(run)["status"] == "completed"
    proc = run_cli([*args, "train.max_steps=8", "debug.faults=crash@6"])
    assert proc.returncode not in (0, 2, 3) and not (run / "summary.json").exists(), proc.returncode


ROLLBACK = ["data.name=synthetic_images", "model.name=mlp", "model.hidden=16", "data.num_workers=0",
            "logging.mlflow.enabled=false", "train.max_steps=8", "train.warmup_steps=0", "train.schedule=constant",
            "checkpoint.every_steps=4", "logging.every_steps=1", "eval.every_steps=0", "data.batch_size=16",
            "data.synthetic_samples=512", "train.nonfinite=rollback", "train.nonfinite_patience=1"]


def test_a_rollback_keeps_this_runs_learning_rate(tmp_path):
    """Resumed with a lower train.lr (after a divergence), then rolled back by a NaN: the rollback
    brought the checkpoint's learning rate back, without a word."""
    from conftest import read_metrics, run_cli

    run = tmp_path / "run"
    assert run_cli([*ROLLBACK, f"run.dir={run}", "train.lr=0.01", "train.max_steps=4"]).returncode == 0
    proc = run_cli([*ROLLBACK, f"run.dir={run}", "train.lr=0.001", "debug.faults=nan@6"])
    assert proc.returncode == 0 and "rolled back to step_00000004" in proc.stderr, proc.stderr[-3000:]
    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    assert all(lrs[s] == pytest.approx(0.001) for s in range(5, 9)), lrs


@pytest.mark.slow
def test_a_rollback_after_a_resume_across_strategies_loads_the_weights(tmp_path):
    """The checkpoint this run resumed from is another strategy's (checkpoint.load_optimizer=false):
    a rollback to it loaded its optimizer state regardless, and DeepSpeed failed on the missing files."""
    from conftest import read_summary, run_cli

    run = tmp_path / "run"
    assert run_cli([*ROLLBACK, f"run.dir={run}", "strategy.name=single", "train.max_steps=4"]).returncode == 0
    proc = run_cli([*ROLLBACK, f"run.dir={run}", "strategy.name=deepspeed", "checkpoint.load_optimizer=false",
                    "debug.faults=nan@6"], env={"DS_ACCELERATOR": "cpu"})
    summary = read_summary(run)
    assert proc.returncode == 0 and summary["status"] == "completed" and summary["steps"] == 8, \
        (summary, proc.stderr[-3000:])
    assert "rolled back to step_00000004" in proc.stderr


def test_deepspeed_without_its_gradient_norm_leaves_the_nonfinite_check_to_the_loop():
    """fp32 DeepSpeed finds a NaN gradient through the global norm it computes: with
    zero_optimization.compute_grad_norm=false it applied the update (weights all NaN)."""
    from dist_train.strategy.deepspeed_config import engine_drops_nonfinite

    assert engine_drops_nonfinite({"zero_optimization": {"stage": 2}})
    assert not engine_drops_nonfinite({"zero_optimization": {"stage": 2, "compute_grad_norm": False}})
    assert engine_drops_nonfinite({"fp16": {"enabled": True}, "zero_optimization": {"compute_grad_norm": False}})
    assert not engine_drops_nonfinite({"bf16": {"enabled": True, "check_grad_overflow": False}})


def test_an_abort_on_a_logging_step_keeps_its_record(tmp_path):
    """train.nonfinite=abort at step 10 (a logging step) checkpointed step 10 and stopped before its
    record: the resumed run's metrics.jsonl had 5, 15, 20. The failed attempt's summary.json had no
    train_loss, throughput, breakdown or checkpoint statistics."""
    from conftest import read_metrics, read_summary, run_cli

    run = tmp_path / "run"
    args = ["model.name=mlp", "data.name=digits", "model.hidden=16", "train.max_steps=20", "logging.every_steps=5",
            "logging.mlflow.enabled=false", "eval.every_steps=0", "train.nonfinite=abort", f"run.dir={run}"]
    assert run_cli([*args, "debug.faults=nan@10"]).returncode == 1
    failed = read_summary(run)  # (what the failed attempt measured: reported, not dropped)
    assert failed["status"] == "failed" and failed["samples_per_s"], failed  # (train_loss: step 10's, NaN: null)
    assert failed["time_breakdown"] and failed["checkpoint"]["last_step"] == 10, failed
    assert run_cli(args).returncode == 0
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [5, 10, 15, 20], records
    assert records[1]["nonfinite_steps"] == 1


def _rollback_to_another_strategys_checkpoint(rank: int, world: int, run_dir: str) -> None:
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config import load_config, to_dict
    from dist_train.data.registry import DataInfo
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training
    from dist_train.train.state import TrainState
    from dist_train.train.step import train_step

    info = DataInfo("classification", (1, 8, 8), 10)
    common = ["model.name=mlp", "model.hidden=16", "data.name=digits", "train.warmup_steps=0", "train.schedule=constant"]
    batch = (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))

    def manager_of(job, strategy):
        return CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job), micro_global_batch=8,
                                 grad_accum_steps=1, seed=0)

    job = load_config(None, ["strategy.name=single", *common])
    torch.manual_seed(0)
    single = build_training(job, detect(), torch.device("cpu"), info)
    train_step(single, iter([batch]), job.train)
    manager = manager_of(job, single)
    manager.save(TrainState(step=1))
    manager.close()
    saved = {k: v.clone() for k, v in single.model.state_dict().items()}

    job = load_config(None, ["strategy.name=deepspeed", "checkpoint.load_optimizer=false", *common])
    ds = build_training(job, detect(), torch.device("cpu"), info)
    manager = manager_of(job, ds)
    try:
        state = TrainState()
        manager.resume(state)
        for _ in range(2):
            train_step(ds, iter([batch]), job.train)
        inner = ds.optimizer.optimizer  # (the engine's torch optimizer over its fp32 partitions)
        assert inner.state, "no optimizer state to reset"
        state.step = 3
        manager.rollback(state)
        assert state.step == 1
        # The weights are the checkpoint's; the moments of the steps after it are gone (the
        # optimizer starts afresh, as at the resume from that checkpoint).
        assert not inner.state, "the rollback kept the diverged steps' AdamW moments"
        weights = {k: v.float() for k, v in ds.unwrapped_model.state_dict().items()}
        assert all(torch.equal(weights[k], saved[k]) for k in saved), "weights are not the checkpoint's"
        train_step(ds, iter([batch]), job.train)  # (and training goes on)
        assert inner.state
    finally:
        manager.close()
        ds.teardown()


@pytest.mark.slow
def test_a_deepspeed_rollback_to_another_strategys_checkpoint_starts_the_optimizer_afresh(tmp_path):
    """Resumed weights-only from another strategy's checkpoint, then rolled back to it: DeepSpeed's
    engine kept the AdamW moments of the steps being undone (the torch strategies cleared theirs)."""
    spawn(_rollback_to_another_strategys_checkpoint, 1, str(tmp_path / "run"))


def test_a_resume_into_other_param_groups_is_refused_unless_weights_only(tmp_path):
    """train.lr_scale (or model.freeze) changed on resume: the optimizer state of other groups
    failed to load deep inside DCP ("Missing key in checkpoint state_dict: optim.param_groups.1.lr",
    exit 1); weights only, the schedule's state of one group broke the step of two."""
    from conftest import read_metrics, read_summary, run_cli

    run = tmp_path / "run"
    args = [*ROLLBACK[:-2], f"run.dir={run}", "train.schedule=linear", "train.max_steps=8"]
    assert run_cli([*args, "train.max_steps=4"]).returncode == 0
    proc = run_cli([*args, "train.lr_scale={out.*: 10}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("optimizer state belongs to other param groups: train.lr_scale={} there, {'out.*': 10.0} here" in proc.stderr
            and "checkpoint.load_optimizer=false" in proc.stderr), proc.stderr[-2000:]
    # Another optimizer (SGD's momentum buffer is not in AdamW's state): refused alike, not a
    # traceback from inside DCP ("Missing key ... momentum", exit 1).
    proc = run_cli([*args, "train.optimizer=sgd"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("saved with train.optimizer=adamw and this run has train.optimizer=sgd with train.momentum=0.9"
            in proc.stderr and "checkpoint.load_optimizer=false" in proc.stderr), proc.stderr[-2000:]
    refused = read_summary(run)  # (the run's progress so far: its newest checkpoint's, not 0)
    assert (refused["exit_code"], refused["steps"], refused["samples_seen"]) == (2, 4, 4 * 16), refused
    proc = run_cli([*args, "train.lr_scale={out.*: 10}", "checkpoint.load_optimizer=false"])
    assert proc.returncode == 0 and read_summary(run)["steps"] == 8, proc.stderr[-3000:]
    lrs = {r["step"]: r["lr"] for r in read_metrics(run)}
    assert lrs[5] == pytest.approx(0.001 * (1 - 4 / 8 * 0.9)), lrs  # (train.lr's group: the schedule goes on)
    # Only a multiplier changed: the same groups, so the optimizer state loads (this run's rates apply).
    proc = run_cli([*args, "train.max_steps=10", "train.lr_scale={out.*: 5}"])
    assert proc.returncode == 0 and read_summary(run)["resumed_from_step"] == 8, proc.stderr[-3000:]
    # A rollback to a checkpoint of other groups (after a weights-only resume): its weights, and a
    # fresh optimizer state, as at that resume (DCP failed on the missing group).
    proc = run_cli([*args, "train.max_steps=12", "train.lr_scale={out.*: 5, hidden1.*: 2}",
                    "checkpoint.load_optimizer=false", *ROLLBACK[-2:], "debug.faults=nan@11"])
    assert proc.returncode == 0 and "rolled back to step_00000010" in proc.stderr, proc.stderr[-3000:]
    assert read_summary(run)["steps"] == 12


def test_which_optimizer_states_load_into_which_optimizers():
    """Adam and AdamW keep the same state; SGD with momentum a buffer, without none."""
    from dist_train.checkpoint.restore import other_optimizer

    def cfg(optimizer, momentum=0.9):
        return {"train": {"optimizer": optimizer, "momentum": momentum}}

    for there, here in [(cfg("adam"), cfg("adamw")), (cfg("adamw"), cfg("adam")), (cfg("sgd"), cfg("sgd", 0.5)),
                        (cfg("sgd"), cfg("sgd", 0.0)), (cfg("sgd", 0), cfg("sgd", 0)), ({}, cfg("sgd"))]:
        assert other_optimizer(there, here) is None, (there, here)
    for there, here in [(cfg("adamw"), cfg("sgd")), (cfg("sgd"), cfg("adam")), (cfg("sgd", 0.0), cfg("sgd"))]:
        assert other_optimizer(there, here).startswith("it was saved with train.optimizer="), (there, here)


def test_deepspeed_refuses_optimizer_partitions_of_the_other_zero_family():
    """ZeRO-3's partitions load only into ZeRO-3, ZeRO-1/2's only into ZeRO-1/2 (DeepSpeed's own
    load failed with a bare AssertionError, exit 1)."""
    from types import SimpleNamespace

    from dist_train.strategy.deepspeed import DeepSpeedStrategy

    files = SimpleNamespace(stored_shapes=lambda: {})
    for stored, current, refused in [(3, 2, True), (2, 3, True), (1, 3, True), (1, 2, False), (3, 3, False)]:
        strategy = SimpleNamespace(cfg=SimpleNamespace(zero_stage=current), cluster=SimpleNamespace(world_size=2),
                                   name="deepspeed", model_shapes=lambda: {},
                                   _own_format=lambda meta: True)
        meta = {"config": {"strategy": {"zero_stage": stored}}, "world_size": 2}
        problem = DeepSpeedStrategy.check_checkpoint(strategy, files, meta, load_optimizer=True)
        assert (problem is not None) == refused, (stored, current, problem)
        if refused:
            assert f"ZeRO-{stored} optimizer partitions" in problem and "checkpoint.load_optimizer=false" in problem
        assert DeepSpeedStrategy.check_checkpoint(strategy, files, meta, load_optimizer=False) is None


def test_a_resume_into_a_training_set_of_another_length_is_refused_mid_epoch(tmp_path):
    """An epoch's order is a permutation of the training set's indices: resumed mid-epoch over one
    more sample, the rest of the epoch came from another permutation (13 of 96 samples seen twice
    and 13 never, exit 0); over fewer, the sampler failed at the first step (exit 1, a traceback).
    At an epoch boundary the next epoch simply draws from the new set."""
    from dist_train.checkpoint.restore import CheckpointRefused

    run, base = tmp_path / "run", [*COMMON, f"run.dir={tmp_path / 'run'}", "checkpoint.every_steps=3"]
    dist_train.fit(_net(), _Noisy(96, 0), overrides=[*base, "train.max_steps=3"])  # 24 of 96: mid-epoch
    for n in (97, 40):
        with pytest.raises(CheckpointRefused, match=rf"sample 24 of an epoch over 96 training samples, and this "
                                                    rf"run's training set has {n}"):
            dist_train.fit(_net(), _Noisy(n, 0), overrides=[*base, "train.max_steps=6"])
    summary = dist_train.fit(_net(), _Noisy(96, 0), overrides=[*base, "train.max_steps=12"])  # to step 12: 96 samples
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 3, summary
    # At an epoch's end any global batch takes over (96 % 10 was refused, though the next epoch starts at 0).
    import shutil

    shutil.copytree(run, tmp_path / "copy")
    summary = dist_train.fit(_net(), _Noisy(96, 0), overrides=[*base, f"run.dir={tmp_path / 'copy'}",
                                                                  "data.batch_size=10", "train.max_steps=13"])
    assert summary["status"] == "completed" and summary["samples_seen"] == 96 + 10, summary
    summary = dist_train.fit(_net(), _Noisy(100, 0), overrides=[*base, "train.max_steps=15"])  # an epoch boundary
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 12, summary


def _datasets_of_other_lengths(rank: int, world: int) -> None:
    from dist_train.config.schema import ConfigError
    from dist_train.train.build import datasets_on_every_rank

    def made(train, evaluation=None):
        return lambda: (train, evaluation, None)

    assert datasets_on_every_rank(made(_Noisy(96, 0)), world)[2] is None
    datasets_on_every_rank(made(_Noisy(96, 0), _Noisy(10, 0)), world)
    with pytest.raises(ConfigError, match=r"the ranks' training sets differ in length \(rank 0: 96, rank 1: 97\)"):
        datasets_on_every_rank(made(_Noisy(96 + rank, 0)), world)
    with pytest.raises(ConfigError, match=r"the ranks' evaluation sets differ in length \(rank 0: 10, rank 1: 11\)"):
        datasets_on_every_rank(made(_Noisy(96, 0), _Noisy(10 + rank, 0)), world)

    def missing_on_rank_1():
        if rank == 1:
            raise FileNotFoundError("/data/train.csv")
        return _Noisy(96, 0), None, None

    # One rank that cannot build its data: it raises its own error, the others say which rank.
    with pytest.raises(FileNotFoundError if rank == 1 else ConfigError,
                       match=r"/data/train.csv" if rank == 1 else r"rank 1 could not build its datasets "
                                                                  r"\(FileNotFoundError: /data/train.csv\)"):
        datasets_on_every_rank(missing_on_rank_1, world)


def test_ranks_whose_datasets_differ_in_length_are_refused_on_every_rank():
    """Each rank draws its share of one order over its own dataset's indices: one more sample on
    one rank (files listed on a node's own disk) repeated and dropped a quarter of each epoch
    without a word; a rank that could not build its data left the others waiting."""
    spawn(_datasets_of_other_lengths, 2)


def test_an_evaluation_with_random_transforms_in_workers_is_the_same_after_a_resume(tmp_path):
    """Evaluation batches in DataLoader workers were not seeded: each persistent worker's stream
    ran on from one evaluation to the next, and started over at a resume (eval_loss at step 8:
    another value than the uninterrupted run's). Each is seeded from its first index now: every
    evaluation draws the same transforms."""
    extra = ["data.num_workers=1", "eval.every_steps=4", "checkpoint.every_steps=4"]

    def evals(run_dir):
        records = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
        return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}

    _fit(tmp_path / "straight", 8, extra)
    _fit(tmp_path / "stopped", 4, extra)
    _fit(tmp_path / "stopped", 8, extra)
    straight, resumed = evals(tmp_path / "straight"), evals(tmp_path / "stopped")
    assert sorted(straight) == [4, 8] and straight == resumed, (straight, resumed)
