"""Your own model, data and loss: dist_train.fit, import paths, entry points, the torchvision zoo,
init_from and freeze, all through real runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, clean_env, free_port, ok, read_metrics, read_summary, run_cli, spawn, train_losses  # noqa: F401
from dist_train import cli

SCRIPTS = REPO / "tests" / "scripts"
FIT = ["train.max_steps=10", "train.warmup_steps=0", "train.lr=0.05", "logging.every_steps=1", "data.num_workers=0",
       "logging.mlflow.enabled=false", "logging.progress_bar=off", "checkpoint.resume=never", "eval.max_batches=2"]


def python_or_torchrun(script: Path, args, nproc: int, cwd: Path = REPO, timeout: float = 300):
    launcher = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                                                    f"--master_port={free_port()}"]
    return subprocess.run([*launcher, str(script), *args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_plain_module_trains_alike_under_every_strategy_through_fit(tmp_path, ok):
    """single (1 x 16) == ddp, fsdp, ZeRO-3 (2 x 8) step by step in fp32, although every rank
    initialised the module differently: fit starts all of them from rank 0's weights."""
    runs = {"single": ["strategy.name=single", "data.batch_size=16"],
            "ddp": ["strategy.name=ddp", "data.batch_size=8"],
            "fsdp": ["strategy.name=fsdp", "data.batch_size=8"],
            "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3", "data.batch_size=8"]}
    dirs = {name: tmp_path / name for name in runs}
    ok(python_or_torchrun(SCRIPTS / "fit_parity.py", [*FIT, *runs["single"], f"run.dir={dirs['single']}"], 0))
    # The three distributed jobs in one torchrun launch: one fit after another in the same
    # processes, a fresh group each (from one rendezvous store: env/rendezvous.py).
    batch = []
    for name in ("ddp", "fsdp", "zero3"):
        batch += [*FIT, *runs[name], f"run.dir={dirs[name]}", "---"]
    ok(python_or_torchrun(SCRIPTS / "fit_parity.py", batch[:-1], 2))
    losses = {}
    for name, run in dirs.items():
        losses[name] = train_losses(run)
        assert sorted(losses[name]) == list(range(1, 11)), name
        s = json.loads((run / "fit.rank0.json").read_text())
        assert s["status"] == "completed" and s["model"] == "fit:Plain" and s["steps"] == 10
        assert s["instance_plain"] and s["instance_is_trained"], (name, s)
        if name != "single":  # the summary comes back on every rank: summary.json's (rank 0's)
            other = json.loads((run / "fit.rank1.json").read_text())
            assert other["instance_plain"] and other["instance_is_trained"], (name, other)
            written = read_summary(run)
            for key in ("status", "steps", "samples_seen", "train_loss", "eval_loss", "eval_accuracy", "samples_per_s",
                        "wall_s", "exit_code", "mlflow_run_id"):
                assert other[key] == s[key] == written[key], (name, key, other[key], s[key], written[key])
    ref = losses["single"]
    assert ref[10] < ref[1]
    for name in ("ddp", "fsdp", "zero3"):
        worst = max(abs(losses[name][s] - ref[s]) / abs(ref[s]) for s in ref)
        assert worst < 1e-5, f"{name}: worst relative difference {worst:.2e}"


@pytest.mark.slow
def test_a_task_that_reaches_into_the_model_trains_alike_under_every_strategy(tmp_path, ok):
    """A task of one's own that calls a method of the model and a submodule directly and adds an
    L2 penalty on a parameter (``fit_parity.reaching``), as a plain loop's loss may: under DDP the
    task got the wrapper (no attribute ``out``), and going around it (``model.module``) reduced no
    gradient, so the ranks' weights drifted apart without an error; under FSDP the root's
    parameters were sharded outside its forward ("mixed torch.Tensor and DTensor"). The task now
    runs inside the wrapper's forward (``Strategy.run_task``): every strategy takes the single
    process's steps, and each rank's instance holds the checkpoint's weights (rank 0's)."""
    runs = {"single": ["strategy.name=single", "data.batch_size=16"],
            "ddp": ["strategy.name=ddp", "data.batch_size=8"],
            "fsdp": ["strategy.name=fsdp", "data.batch_size=8"],
            "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2", "data.batch_size=8"]}
    dirs = {name: tmp_path / name for name in runs}
    common = ["TASK=reaching", *FIT, "train.max_steps=6"]
    ok(python_or_torchrun(SCRIPTS / "fit_parity.py", [*common, *runs["single"], f"run.dir={dirs['single']}"], 0))
    batch = []
    for name in ("ddp", "fsdp", "zero2"):
        batch += [*common, *runs[name], f"run.dir={dirs[name]}", "---"]
    ok(python_or_torchrun(SCRIPTS / "fit_parity.py", batch[:-1], 2))
    ref = train_losses(dirs["single"])
    assert sorted(ref) == list(range(1, 7)) and ref[6] < ref[1], ref
    for name in ("ddp", "fsdp", "zero2"):
        losses = train_losses(dirs[name])
        worst = max(abs(losses[s] - ref[s]) / abs(ref[s]) for s in ref)
        assert worst < 1e-5, f"{name}: worst relative difference {worst:.2e}"
        for rank in (0, 1):
            s = json.loads((dirs[name] / f"fit.rank{rank}.json").read_text())
            assert s["status"] == "completed" and s["instance_is_trained"], (name, rank, s)
            assert s["eval_penalty"] > 0, s


# The config keys that build what fit_parity's OPTIM=own passes as objects: SGD with momentum at
# 0.05, the hidden layer's group at 0.02, StepLR(step_size=3, gamma=0.5), no warmup.
OWN_OPTIM_AS_KEYS = ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=0",
                     "train.lr_scale={hidden.*: 0.4}", "train.schedule=step", "train.step_size=3", "train.gamma=0.5",
                     "train.warmup_steps=0"]


@pytest.mark.slow
def test_a_plain_loops_own_optimizer_and_scheduler_train_alike_under_every_strategy(tmp_path, ok):
    """``fit(..., optimizer=SGD([...groups...], lr, momentum), scheduler=lambda opt: StepLR(opt, 3))``,
    the optimizer built over the module before fit as a plain loop builds it: rebuilt over the
    strategy's parameters by name (FSDP's are new DTensors, DeepSpeed's engine holds it), it takes
    the steps of the same optimizer and schedule built from config keys, under every strategy."""
    runs = {"single": ["strategy.name=single", "data.batch_size=16"],
            "ddp": ["strategy.name=ddp", "data.batch_size=8"],
            "fsdp": ["strategy.name=fsdp", "data.batch_size=8"],
            "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2", "data.batch_size=8"],
            "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3", "data.batch_size=8"]}
    keys = tmp_path / "keys"
    common = [*FIT, "train.max_steps=7"]
    # Also train.scheduler_interval=epoch (4 steps to an epoch of 64 samples), which DeepSpeed's
    # engine must not step per step: the config's StepLR halving the rate after each epoch.
    # train.epochs=2 sets 8 steps on every rank alike.
    per_epoch = ["SAMPLES=64", *common, "train.epochs=2", "train.scheduler_interval=epoch", "train.schedule=step",
                 "train.step_size=1", "train.gamma=0.5", "eval.every_epochs=1"]
    ok(python_or_torchrun(SCRIPTS / "fit_parity.py", [*common, *OWN_OPTIM_AS_KEYS, *runs["single"], f"run.dir={keys}"]
                          + ["---", "OPTIM=own", *common, *runs["single"], f"run.dir={tmp_path / 'single'}"]
                          + ["---", *per_epoch, *runs["single"], f"run.dir={tmp_path / 'epoch_single'}"], 0))
    batch = []
    for name in ("ddp", "fsdp", "zero2", "zero3"):
        batch += ["OPTIM=own", *common, *runs[name], f"run.dir={tmp_path / name}", "---"]
    for name in ("ddp", "fsdp", "zero2"):  # (and the best evaluation's checkpoint kept: DDP's saved in the background)
        best = ["checkpoint.best_metric=eval_loss", "checkpoint.keep_last=1"] + (
            ["checkpoint.async_save=true"] if name == "ddp" else [])
        batch += [*per_epoch, *runs[name], *best, f"run.dir={tmp_path / ('epoch_' + name)}", "---"]
    # ZeRO-2 stopped at step 6, in the middle of the second epoch, and resumed: its engine was not
    # given the scheduler, whose state comes back from meta.json.
    for extra in (["train.epochs=0", "train.max_steps=6", "checkpoint.resume=never"], ["checkpoint.resume=auto"]):
        batch += [*per_epoch, *runs["zero2"], *extra, f"run.dir={tmp_path / 'epoch_zero2_resumed'}", "---"]
    # Stopped after 4 steps and resumed by a second fit (FSDP's DCP checkpoint, DeepSpeed's own).
    for name in ("fsdp", "zero2"):
        for steps, resume in ((4, "never"), (7, "auto")):
            batch += ["OPTIM=own", *common, *runs[name], f"train.max_steps={steps}", f"checkpoint.resume={resume}",
                      f"run.dir={tmp_path / (name + '_resumed')}", "---"]
    ok(python_or_torchrun(SCRIPTS / "fit_parity.py", batch[:-1], 2))
    ref = train_losses(keys)
    assert sorted(ref) == list(range(1, 8)) and ref[7] < ref[1], ref
    lrs = {r["step"]: r["lr"] for r in read_metrics(keys) if "lr" in r}
    for name in runs:
        losses = train_losses(tmp_path / name)
        worst = max(abs(losses[s] - ref[s]) / abs(ref[s]) for s in ref)
        assert worst < 1e-5, f"{name}: worst relative difference {worst:.2e}"
        own_lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / name) if "lr" in r}  # (the first group's:
        assert own_lrs == pytest.approx({k: 0.4 * v for k, v in lrs.items()}, rel=1e-9), name  # hidden, x 0.4)
        s = json.loads((tmp_path / name / "fit.rank0.json").read_text())
        assert s["status"] == "completed" and s["instance_is_trained"], (name, s)
    epoch_ref = train_losses(tmp_path / "epoch_single")
    for name in ("epoch_single", "epoch_ddp", "epoch_fsdp", "epoch_zero2", "epoch_zero2_resumed"):
        lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / name) if "lr" in r}
        assert lrs == {s: pytest.approx(0.05 * 0.5 ** ((s - 1) // 4)) for s in range(1, 9)}, (name, lrs)
        evals = {r["step"]: r["eval_loss"] for r in read_metrics(tmp_path / name) if "eval_loss" in r}
        assert {4, 8} <= set(evals), name  # (+ 6: an end)
        if name in ("epoch_ddp", "epoch_fsdp", "epoch_zero2"):
            best = json.loads((tmp_path / name / "checkpoints" / "best.json").read_text())
            assert best["step"] == min(evals, key=evals.get) and best["value"] == pytest.approx(min(evals.values()))
            assert (tmp_path / name / "checkpoints" / best["checkpoint"]).is_dir(), best
            for rank in (0, 1):  # (fit's summary on every rank)
                assert json.loads((tmp_path / name / f"fit.rank{rank}.json").read_text())["status"] == "completed"
        losses = train_losses(tmp_path / name)
        assert max(abs(losses[s] - epoch_ref[s]) / abs(epoch_ref[s]) for s in epoch_ref) < 1e-5, (name, losses, epoch_ref)
    for name in ("fsdp", "zero2"):  # (the moments and the schedule's position came back)
        whole, resumed = train_losses(tmp_path / name), train_losses(tmp_path / (name + "_resumed"))
        assert sorted(resumed) == list(range(1, 8)) and all(resumed[s] == whole[s] for s in range(5, 8)), (name, whole, resumed)
    config = (tmp_path / "fsdp" / "config.yaml").read_text()
    assert "optimizer: fit:SGD" in config and "schedule: fit:StepLR" in config, config


@pytest.mark.slow
def test_deepspeed_bf16_trains_a_copy_and_hands_back_the_fp32_weights(tmp_path, ok):
    """Under bf16 the engine casts the module it is given in place and hooks it (ZeRO-1/2 too):
    the instance given to fit came back bf16, its values rounded, and failed on fp32 input."""
    runs = {stage: tmp_path / f"zero{stage}" for stage in (1, 2)}
    batch = []
    for stage, run in runs.items():
        batch += [*FIT, "strategy.name=deepspeed", f"strategy.zero_stage={stage}", "train.precision=bf16",
                  "data.batch_size=8", f"run.dir={run}", "---"]
    ok(python_or_torchrun(SCRIPTS / "fit_parity.py", batch[:-1], 2))
    for stage, run in runs.items():
        for rank in (0, 1):
            s = json.loads((run / f"fit.rank{rank}.json").read_text())
            assert s["status"] == "completed" and s["instance_plain"] and s["instance_is_trained"], (stage, rank, s)


def test_fit_rejects_bad_input_before_any_process_group(tmp_path):
    import dist_train
    from torch.utils.data import IterableDataset, TensorDataset

    data = TensorDataset(torch.randn(8, 2), torch.zeros(8, dtype=torch.long))
    with pytest.raises(dist_train.ConfigError, match="train.max_stepz"):
        dist_train.fit(torch.nn.Linear(2, 2), data, overrides=["train.max_stepz=3"])
    with pytest.raises(dist_train.ConfigError, match="strategy.name"):
        dist_train.fit(torch.nn.Linear(2, 2), data, config={"strategy": {"name": "nope"}})

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(2), 0

    with pytest.raises(dist_train.ConfigError, match="IterableDataset"):
        dist_train.fit(torch.nn.Linear(2, 2), Stream(), overrides=[f"run.dir={tmp_path}", *FIT])
    with pytest.raises(dist_train.ConfigError, match="nn.Module"):
        dist_train.fit(lambda: "not a model", data, overrides=[f"run.dir={tmp_path / 'b'}", *FIT, "data.batch_size=4"])
    # model.freeze against the instance's names: before the process group, not after it (exit 2 late)
    with pytest.raises(dist_train.ConfigError, match=r"model.freeze.*'head\.\*' matches no parameter; names look "
                                                     r"like weight, bias"):
        dist_train.fit(torch.nn.Linear(2, 2), data, overrides=[f"run.dir={tmp_path / 'c'}", *FIT, "model.freeze=[head.*]"])
    # fit's own objects, checked as the run would take them: before the run starts, nothing written
    for kwargs, words in (({"task": "nope"}, r"^task: unknown task 'nope'"), ({"task": 42}, r"^task: .*int"),
                          ({"model": 42}, r"^model: must be a torch.nn.Module or a zero-argument callable")):
        with pytest.raises(dist_train.ConfigError, match=words):
            dist_train.fit(**{"model": torch.nn.Linear(2, 2), "train_data": data, **kwargs},
                           overrides=[f"run.dir={tmp_path / 'd'}", *FIT])
    assert not (tmp_path / "d").exists()
    assert not torch.distributed.is_initialized()

    # The built-in datasets' preprocessing keys would be ignored: fit's data is used as it is.
    with pytest.raises(dist_train.ConfigError, match=r"data.augment: applies to the built-in image datasets only; "
                                                     r"a dataset of your own \(fit's train_data\)"):
        dist_train.fit(torch.nn.Linear(2, 2), data, overrides=[f"run.dir={tmp_path / 'c'}", *FIT, "data.augment=[hflip]"])


def test_a_freeze_pattern_a_zoo_model_lacks_is_refused_by_the_check():
    proc = run_cli(["--check", "model.name=torchvision:resnet18", "data.name=digits", "model.freeze=[layer9.*]"])
    assert proc.returncode == 2 and "model.freeze" in proc.stderr and "'layer9.*' matches no parameter" in proc.stderr, \
        proc.stderr
    assert run_cli(["--check", "model.name=torchvision:resnet18", "data.name=digits",
                    "model.freeze=[layer1.*]"]).returncode == 0


def test_train_deterministic_holds_during_the_job_and_is_undone_after(tmp_path, monkeypatch):
    """train.deterministic=true: the model's forward passes run with deterministic kernels and a
    fixed cuBLAS workspace; when fit returns, the caller's settings are back."""
    import dist_train
    from torch.utils.data import TensorDataset

    seen = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append((torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled(),
                         torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
            return super().forward(x)

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    data = TensorDataset(torch.randn(32, 2), torch.randint(0, 2, (32,)))
    summary = dist_train.fit(Probe(2, 2), data, overrides=[f"run.dir={tmp_path}", *FIT, "data.batch_size=8",
                                                           "train.max_steps=2", "train.deterministic=true"])
    assert summary["status"] == "completed"
    assert seen and all(s == (True, True, True, ":4096:8") for s in seen), seen[:3]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seen.clear()
    dist_train.fit(Probe(2, 2), data, overrides=[f"run.dir={tmp_path / 'off'}", *FIT, "data.batch_size=8",
                                                 "train.max_steps=1"])
    assert seen and not any(s[0] for s in seen)


def test_a_task_of_ones_own_gets_the_batch_as_the_dataset_collated_it(tmp_path):
    """``x, y = batch`` in a user's task, in training, evaluation and the FLOP count (on meta
    tensors); a dataset of one-element items is not given the sample indices as a target."""
    import dist_train
    from torch.utils.data import TensorDataset

    seen = []

    def task(model, batch):
        x, y = batch  # (the loaders' sample indices are taken off)
        seen.append((x.device.type, tuple(x.shape), y.dtype))
        return torch.nn.functional.cross_entropy(model(x), y)

    data = TensorDataset(torch.randn(32, 2), torch.randint(0, 2, (32,)))
    summary = dist_train.fit(torch.nn.Linear(2, 2), data, data, task=task,
                             overrides=[f"run.dir={tmp_path}", *FIT, "data.batch_size=8", "train.max_steps=3"])
    assert summary["status"] == "completed" and summary["eval_loss"] is not None
    assert seen[0] == ("meta", (8, 2), torch.int64), seen  # the FLOP count, then 3 steps and the evaluation
    assert seen.count(("cpu", (8, 2), torch.int64)) == 3 and len(seen) >= 5, seen
    with pytest.raises(dist_train.TrainingFailed, match="a batch must be"):  # (x,) items: no target to learn
        dist_train.fit(torch.nn.Linear(2, 2), TensorDataset(torch.randn(32, 2)),
                       overrides=[f"run.dir={tmp_path / 'no_target'}", *FIT, "data.batch_size=8", "train.max_steps=1"])


def test_list_items_and_list_batches_lose_their_sample_indices_too(tmp_path):
    """Items that are lists (and tuple batches that an older torch's pin_memory turned into lists)
    carry the indices as well, and a task gets them off alike; a dataset whose len() fails in
    preflight is reported by the run, as TrainingFailed, not as a bare exception."""
    import dist_train
    from dist_train.train.sources import MapDataset
    from dist_train.train.tasks import without_indices

    class ListItems(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return [torch.full((2,), float(i)), i % 2]

    batch = MapDataset(ListItems(), "train_data").__getitems__([3, 5])
    assert isinstance(batch, list) and len(batch) == 3 and batch[-1].tolist() == [3, 5]
    x, y = without_indices(batch)
    assert x[:, 0].tolist() == [3.0, 5.0] and y.tolist() == [1, 1]
    assert without_indices([]) == [] and isinstance(without_indices((x, y, batch[-1])), tuple)

    import collections

    Pair = collections.namedtuple("Pair", "image label")

    class NamedItems(ListItems):
        def __getitem__(self, i):
            return Pair(torch.full((2,), float(i)), i % 2)

    named = without_indices(MapDataset(NamedItems(), "train_data").__getitems__([3, 5]))
    assert isinstance(named, Pair) and named.label.tolist() == [1, 1]  # the user's type, as collated

    seen = []

    def task(model, batch):
        x, y = batch
        seen.append(type(batch))
        return torch.nn.functional.cross_entropy(model(x), y)

    summary = dist_train.fit(torch.nn.Linear(2, 2), ListItems(), task=task,
                             overrides=[f"run.dir={tmp_path}", *FIT, "data.batch_size=8", "train.max_steps=2"])
    assert summary["status"] == "completed" and seen.count(list) >= 2
    summary = dist_train.fit(torch.nn.Linear(2, 2), NamedItems(), task=task,
                             overrides=[f"run.dir={tmp_path / 'named'}", *FIT, "data.batch_size=8", "train.max_steps=2"])
    assert summary["status"] == "completed" and seen.count(Pair) >= 2

    class LazyIndex(ListItems):
        def __len__(self):
            raise RuntimeError("lazy index not built")

    with pytest.raises(dist_train.TrainingFailed, match="lazy index not built"):
        dist_train.fit(torch.nn.Linear(2, 2), LazyIndex(),
                       overrides=[f"run.dir={tmp_path / 'lazy'}", *FIT, "data.batch_size=8", "train.max_steps=1"])


def test_train_deterministic_keeps_a_callers_strict_mode():
    from dist_train.env.seed import deterministic_kernels

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)  # strict: an op without a deterministic kernel raises
        with deterministic_kernels(True):
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_import_path_model_dataset_and_task_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(SCRIPTS)  # the working directory is importable
    run = tmp_path / "run"
    code = cli.main(["model.name=plugin_pkg:build_net", "model.args.hidden=8", "data.name=plugin_pkg:build_data",
                     "task.name=plugin_pkg:l1_task", "data.batch_size=16", *FIT, f"run.dir={run}"])
    assert code == 0
    s = read_summary(run)
    assert s["status"] == "completed" and s["steps"] == 10 and "eval_max_err" in s and "eval_loss" in s
    assert all("max_err" in r for r in read_metrics(run) if "loss" in r)  # the task's metric, logged



@pytest.mark.slow
def test_a_users_random_transforms_in_workers_resume_exactly(tmp_path, ok):
    """A dataset of one's own that draws its augmentation from the global generators, loaded by a
    DataLoader worker: a run killed at step 5 and started again gives the per-step losses of the run
    that was never interrupted (the worker's generators are seeded per batch, not once per worker)."""
    args = ["model.name=plugin_pkg:build_net", "model.args.hidden=8", "data.name=plugin_pkg:build_jittered_data",
            "task.name=plugin_pkg:l1_task", "data.batch_size=16", "data.num_workers=1", "checkpoint.every_steps=3",
            *[a for a in FIT if not a.startswith(("data.num_workers", "checkpoint.resume"))]]
    env = {"PYTHONPATH": str(SCRIPTS)}
    ok(run_cli([*args, f"run.dir={tmp_path / 'whole'}"], env=env))
    crashed = run_cli([*args, "debug.faults=crash@5", f"run.dir={tmp_path / 'killed'}"], env=env)
    assert crashed.returncode not in (0, 2), crashed.stderr[-2000:]
    ok(run_cli([*args, f"run.dir={tmp_path / 'killed'}"], env=env))
    assert read_summary(tmp_path / "killed")["resumed_from_step"] == 3
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "whole")


def test_a_preemption_at_the_last_step_leaves_the_final_evaluation_to_the_resumed_run(tmp_path, ok):
    """SIGTERM while the last step's batch is fetched: the run checkpoints and exits 3 (preempted, so
    the scheduler requeues it) instead of calling itself completed without its final evaluation;
    the rerun trains no step, evaluates, and reports the last training loss."""
    batch, steps = 16, 6
    args = ["model.name=plugin_pkg:build_net", "model.args.hidden=8", "task.name=plugin_pkg:l1_task",
            f"data.batch_size={batch}", *[a for a in FIT if not a.startswith(("checkpoint.resume", "train.max_steps"))],
            f"train.max_steps={steps}", f"run.dir={tmp_path}"]
    env = {"PYTHONPATH": str(SCRIPTS)}
    # The FLOPs count fetches one batch first, then each step one: the last step's first sample.
    at = (1 + steps - 1) * batch + 1
    first = run_cli([*args, "data.name=plugin_pkg:build_signalled_data", f"data.args.sigterm_at_sample={at}"], env=env)
    ok(first, 3)
    s = read_summary(tmp_path)
    assert s["status"] == "preempted" and s["steps"] == steps and s["eval_loss"] is None, s
    ok(run_cli([*args, "data.name=plugin_pkg:build_signalled_data", "data.args.sigterm_at_sample=0"], env=env))
    s = read_summary(tmp_path)
    assert s["status"] == "completed" and s["resumed_from_step"] == steps and s["eval_loss"] is not None, s
    assert s["train_loss"] == train_losses(tmp_path)[steps], s
    # A rerun of the finished run evaluates nothing again (the final checkpoint records the
    # evaluation) and still reports its metrics.
    evals = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    ok(run_cli([*args, "data.name=plugin_pkg:build_signalled_data", "data.args.sigterm_at_sample=0"], env=env))
    again = read_summary(tmp_path)
    assert again["status"] == "completed" and again["eval_loss"] == s["eval_loss"], again
    assert [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line] == evals
    assert len(evals) == 1, evals
    # One object per logged step: the rerun's evaluation joined the last step's record.
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1)) and all("loss" in r for r in records), records
    # The goodput ledger: the preempted attempt is the only one whose successor is a restart.
    attempts = json.loads((tmp_path / "goodput.json").read_text())["attempts"]
    assert [a["completed"] for a in attempts] == [False, True, True], attempts
    assert attempts[1]["downtime_s"] > 0 and attempts[2]["downtime_s"] == 0, attempts

@pytest.mark.parametrize("override,key,words", [
    ("model.name=no_such_module:build", "model.name", "cannot import 'no_such_module'"),
    ("model.name=plugin_pkg:missing", "model.name", "has no attribute 'missing'"),
    ("data.name=plugin_pkg:nothing", "data.name", "has no attribute"),
    ("task.name=plugin_pkg:nope", "task.name", "has no attribute"),
    ("model.name=torchvision:resnet9000", "model.name", "torchvision has no"),
    ("model.name=plugin_pkg:raises", "model.name", "the builder's own message"),
    ("model.name=plugin_pkg:not_a_module", "model.name", "torch.nn.Module"),
    ("data.name=plugin_pkg:build_data data.resize=16", "data.resize", "data.name='plugin_pkg:build_data') is used as"),
])
def test_each_bad_import_path_exits_2_naming_the_key(override, key, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(SCRIPTS)
    assert cli.main(["data.name=digits", *FIT, *override.split(), f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert key in err and words in err, err
    if override == "model.name=plugin_pkg:raises":  # a builder of one's own that raised: where, in its code
        assert "plugin_pkg.py:75, in raises)" in err, err
    assert "Traceback" not in err  # (exit 2: one message)


def test_entry_points_of_an_installed_package(tmp_path, ok):
    """A package declaring entry points (a real .dist-info on the path, as pip installs it)."""
    site = tmp_path / "site"
    (site / "toy_plugins").mkdir(parents=True)
    (site / "toy_plugins" / "__init__.py").write_text((SCRIPTS / "plugin_pkg.py").read_text())
    info = site / "toy_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dist_train.models]\nsumnet = toy_plugins:build_net\n"
                                           "[dist_train.datasets]\nsums = toy_plugins:build_data\n"
                                           "[dist_train.tasks]\nl1 = toy_plugins:l1_task\n")
    run = tmp_path / "run"
    env = {"PYTHONPATH": f"{REPO}:{site}"}
    proc = subprocess.run([sys.executable, "-m", "dist_train", "model.name=sumnet", "data.name=sums", "task.name=l1",
                           "data.batch_size=16", *FIT, f"run.dir={run}"], cwd=tmp_path, env=clean_env(env),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    ok(proc)
    assert read_summary(run)["steps"] == 10 and "eval_max_err" in read_summary(run)


def test_torchvision_zoo_model_with_the_datasets_classes(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["model.name=torchvision:mobilenet_v3_small", "data.name=synthetic_images", "data.batch_size=4",
                     "data.synthetic_samples=64", "train.max_steps=2", "eval.max_batches=1", "data.eval_batch_size=8",
                     *FIT[2:], f"run.dir={run}"]) == 0
    s = read_summary(run)
    assert s["status"] == "completed" and s["model"] == "torchvision:mobilenet_v3_small"


def test_torchvision_zoo_model_on_grayscale_images_keeps_torchvisions_state_dict():
    """The README's resnet on fashion_mnist: 1-channel images into a 3-channel conv1 passed --check
    and failed at the first step. They are repeated to 3 channels; the keys and shapes stay
    torchvision's (ImageNet weights load through model.init_from), and the output is the 3-channel
    model's on the repeated image."""
    import torchvision
    from types import SimpleNamespace

    from dist_train.config import ConfigError
    from dist_train.plugins import torchvision_model

    gray = SimpleNamespace(task="classification", input_shape=(1, 8, 8), num_classes=10)
    model = torchvision_model("torchvision:resnet18", {}, gray).eval()
    reference = torchvision.models.resnet18(num_classes=10).eval()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x.repeat(1, 3, 1, 1)))
    with pytest.raises(ConfigError, match="torchvision:resnet18 takes 3-channel images; the dataset's have 4"):
        torchvision_model("torchvision:resnet18", {}, SimpleNamespace(**{**vars(gray), "input_shape": (4, 8, 8)}))


def test_init_from_gives_the_source_models_outputs_and_reports_a_new_head(tmp_path):
    from types import SimpleNamespace

    from dist_train.config import load_config
    from dist_train.env.cluster import detect
    from dist_train.models import build_model
    from dist_train.train.build import build_training

    info = SimpleNamespace(task="classification", input_shape=(1, 8, 8), num_classes=10, seq_len=None)
    torch.manual_seed(7)
    source = build_model(load_config(None, ["model.name=mlp"]).model, info).eval()
    torch.save({"model": source.state_dict()}, tmp_path / "source.pt")
    job = load_config(None, ["model.name=mlp", f"model.init_from={tmp_path / 'source.pt'}", "strategy.name=single"])
    torch.manual_seed(8)  # another init: only the loaded weights can make the outputs equal
    strategy = build_training(job, detect(), torch.device("cpu"), info)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(strategy.model.eval()(x), source(x))
    # A new head (3 classes): everything else loads, the head's shape mismatch is reported.
    from dist_train.train.sources import init_from

    other = build_model(load_config(None, ["model.name=mlp"]).model, SimpleNamespace(**{**vars(info), "num_classes": 3}))
    report = init_from(other, str(tmp_path / "source.pt"))
    assert report["shape_mismatch"] == ["out.bias", "out.weight"]
    assert report["missing"] == []  # (the file has the head: its shape differs, it is not missing)
    assert len(report["loaded"]) == len(source.state_dict()) - len(report["shape_mismatch"])


def _init_from_a_file_of_shards(rank: int, world_size: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dist_train.config.schema import ConfigError
    from dist_train.train.sources import init_from

    mesh = init_device_mesh("cpu", (world_size,))
    net = torch.nn.Linear(4, 2)
    torch.save({k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in net.state_dict().items()}, path)
    with pytest.raises(ConfigError, match=r"model.init_from.*holds DTensor shards \(weight, ...\).*export"):
        init_from(torch.nn.Linear(4, 2), path)


def test_init_from_a_file_of_one_ranks_shards_is_refused_naming_them(tmp_path):
    """torch.save of a sharded (FSDP2) model's state_dict writes DTensors, one rank's pieces: as
    model.init_from it is refused with the reason, not loaded into a plain module's error."""
    spawn(_init_from_a_file_of_shards, 1, str(tmp_path / "shards.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2-bf16", "zero3-bf16"])  # (zero3-bf16: ZeRO-3's partitions too)
def test_frozen_parameters_stay_bitwise_unchanged(strategy, tmp_path, ok):
    """And the checkpoint's weights hold them: under ZeRO-3 a frozen parameter above DeepSpeed's
    persistence threshold (hidden2: 320x320 > 1e5 elements) is partitioned and not in the
    optimizer, and was written as this rank's empty partition. Under DeepSpeed bf16 the engine
    holds the module in bf16 and fp32 master copies only of what its optimizer holds: the frozen
    parameters' fp32 values were written rounded to bf16."""
    from dist_train.checkpoint import storage

    src = tmp_path / "init.pt"
    torch.manual_seed(3)
    from dist_train.config import load_config
    from dist_train.models import build_model
    from types import SimpleNamespace

    model = ["model.name=mlp", "model.hidden=320"]
    info = SimpleNamespace(task="classification", input_shape=(1, 8, 8), num_classes=10, seq_len=None)
    torch.save(build_model(load_config(None, model).model, info).state_dict(), src)
    run = tmp_path / strategy
    how = {"zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
           "zero2-bf16": ["strategy.name=deepspeed", "strategy.zero_stage=2", "train.precision=bf16"],
           "zero3-bf16": ["strategy.name=deepspeed", "strategy.zero_stage=3", "train.precision=bf16"],
           }.get(strategy, [f"strategy.name={strategy}"])
    ok(run_cli([*model, "data.name=digits", *how, f"model.init_from={src}",
                "model.freeze=[hidden2.*]", "data.batch_size=16", *FIT, f"run.dir={run}"], nproc=2))
    before = torch.load(src, weights_only=True)
    after = storage.load_full_model(str(run / "checkpoints/step_00000010/dcp"))
    frozen = [k for k in before if k.startswith("hidden2.")]
    trained = [k for k in before if k not in frozen and before[k].is_floating_point()]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def test_a_language_model_of_ones_own_reports_tokens_per_second(tmp_path):
    """fit's own token windows with task="language_model": no dataset info gives a sequence length,
    so tokens per sample come from the first micro-batch (its inputs' length): tokens_per_s and
    tflops are reported as for the built-in text datasets."""
    import dist_train
    from torch.utils.data import TensorDataset

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32)

        def forward(self, ids):
            return self.head(self.emb(ids))

    tokens = torch.randint(0, 32, (64, 13))
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])  # 12 tokens per sample
    dist_train.fit(TinyLM(), data, task="language_model",
                   overrides=[f"run.dir={tmp_path}", *FIT, "data.batch_size=8", "train.max_steps=3"])
    records = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert records and all(r["tokens_per_s"] == pytest.approx(12 * r["samples_per_s"]) for r in records)
    assert all(r["tflops"] > 0 for r in records)


def test_a_model_handed_over_in_eval_mode_trains_in_training_mode(tmp_path):
    """A plain loop calls model.train() itself: fit does too, before the first step (a model
    handed over after an evaluation kept Dropout off and BatchNorm on its running statistics)."""
    import dist_train
    from torch.utils.data import TensorDataset

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
            self.modes = []

        def forward(self, x):
            self.modes.append((self.training, torch.is_grad_enabled()))
            return self.net(x)

    model = Probe().eval()
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    dist_train.fit(model, data, eval_data=data, overrides=[f"run.dir={tmp_path}", *FIT, "data.batch_size=8",
                                                          "train.max_steps=4", "eval.every_steps=2"])
    trained = [training for training, grad in model.modes if grad]
    assert trained and all(trained), model.modes
    assert model.net[1].num_batches_tracked.item() == 4  # BatchNorm updated its statistics every step


def test_a_task_of_ones_own_is_evaluated_as_a_mean_over_samples():
    """Each batch's mean loss counted once made a short last batch weigh as much as a full one: the
    evaluation changed with the eval batch size and the world size."""
    from dist_train.train.tasks import CallableTask

    def l1(model, batch):
        x, y = batch
        err = (model(x) - y).abs()
        return err.mean(), {"worst": err.max()}

    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(3, 1), torch.randn(11, 3), torch.randn(11, 1)
    per_sample = (model(x) - y).abs().detach()
    for split in ([11], [8, 3], [5, 5, 1]):
        task = CallableTask(l1)
        sums, start = None, 0
        for n in split:
            part = task.eval_sums(model, (x[start:start + n], y[start:start + n]))
            sums, start = part if sums is None else sums + part, start + n
        got = task.eval_metrics(sums)
        assert got["eval_loss"] == pytest.approx(float(per_sample.mean()), rel=1e-6), (split, got)


def test_fit_leaves_the_callers_logging_as_it_was(tmp_path, capsys):
    """fit in a user's script removed every root handler for good: the script's own log file got
    nothing after the call. dist_train's console goes on its own logger for the call only."""
    import logging

    import dist_train
    from torch.utils.data import TensorDataset

    root = logging.getLogger()
    mine = logging.FileHandler(tmp_path / "user.log")
    before = (list(root.handlers), root.level)
    root.addHandler(mine)
    try:
        data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
        dist_train.fit(torch.nn.Linear(4, 2), data, overrides=[f"run.dir={tmp_path / 'run'}", *FIT,
                                                              "data.batch_size=8", "train.max_steps=2"])
        logging.getLogger("myapp").warning("after fit")
        assert mine in root.handlers and root.level == before[1]
        assert "[rank0] INFO dist_train: run default" in capsys.readouterr().err  # (its console, during the call)
        assert logging.getLogger("dist_train").propagate and not logging.getLogger("dist_train").handlers
    finally:
        root.removeHandler(mine)
        mine.close()
    assert "after fit" in (tmp_path / "user.log").read_text()


def test_batch_size_of_a_batch_without_a_target():
    """A task of one's own may take a dict of model inputs with no target: the evaluation counts
    its samples (it raised a KeyError) from its first tensor."""
    from dist_train.train.tasks import batch_size

    assert batch_size({"input_ids": torch.zeros(4, 8), "mask": torch.ones(4, 8)}) == 4
    assert batch_size((torch.zeros(3, 2), torch.zeros(3))) == 3 and batch_size(()) == 0


UNUSED = '''
import sys, torch
import dist_train
from torch.utils.data import TensorDataset

class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.used(x)

data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
try:
    dist_train.fit(Branchy(), data, overrides=sys.argv[1:])
except dist_train.TrainingFailed as exc:
    print("FAILED:", exc)
'''


@pytest.mark.slow
def test_ddp_names_find_unused_parameters_when_a_parameter_gets_no_gradient(tmp_path):
    script = tmp_path / "unused.py"
    script.write_text(UNUSED)
    proc = python_or_torchrun(script, [*FIT, "strategy.name=ddp", "data.batch_size=4", f"run.dir={tmp_path / 'run'}"], 2)
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "failed" and "strategy.find_unused_parameters=true" in summary["error"], \
        (summary, proc.stdout[-2000:], proc.stderr[-3000:])


class _Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((2,), float(i)), i % 2


def test_a_dataset_class_is_a_builder_like_a_function(tmp_path):
    """fit(Net, DatasetClass): the class was taken for a dataset (a class has __getitem__ too) and
    the run failed on len(class)."""
    import dist_train

    summary = dist_train.fit(lambda: torch.nn.Linear(2, 2), _Squares, eval_data=_Squares,
                             overrides=[f"run.dir={tmp_path}", *FIT, "data.batch_size=4"])
    assert summary["status"] == "completed" and summary["eval_loss"] is not None


def test_a_vision_transformer_on_small_images_is_told_about_data_resize():
    """torchvision:vit_b_16 on 28x28 images failed with torchvision's bare assertion."""
    from dist_train.train.job import _peer_hint

    hint = _peer_hint(AssertionError("Wrong image height! Expected 224 but got 28!"))
    assert "data.resize=224" in hint
    assert _peer_hint(ValueError("something else")) == ""


class _VarLen(torch.utils.data.Dataset):
    """Sequences of 2 to 6 features, labelled by their mean's sign."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randn(int(torch.randint(2, 7, (1,), generator=g)), generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i], int(self.items[i].mean() > 0)


def _pad(items):
    xs, ys = zip(*items)
    return torch.stack([torch.nn.functional.pad(x, (0, 6 - len(x))) for x in xs]), torch.tensor(ys)


def test_collate_fn_batches_items_of_different_lengths(tmp_path):
    """A DataLoader's collate_fn (padding variable-length items) is fit's too; without one, the
    error of default_collate says what to do."""
    from dist_train.api import TrainingFailed, fit
    from dist_train.config.schema import ConfigError

    base = [f"run.dir={tmp_path}", "train.max_steps=3", "data.batch_size=4", "logging.mlflow.enabled=false",
            "checkpoint.every_steps=0"]
    with pytest.raises(TrainingFailed, match="items of a batch have different shapes.*collate_fn"):
        fit(torch.nn.Linear(6, 2), _VarLen(16), overrides=base)
    with pytest.raises(ConfigError, match="collate_fn: must be a callable"):
        fit(torch.nn.Linear(6, 2), _VarLen(16), collate_fn="pad", overrides=base)
    for workers in (0, 1):
        summary = fit(torch.nn.Linear(6, 2), _VarLen(16), eval_data=_VarLen(6), collate_fn=_pad,
                      overrides=[*base, f"data.num_workers={workers}", "checkpoint.resume=never"])
        assert summary["status"] == "completed" and summary["eval_loss"] is not None, summary
    # A mapping that is not a dict (a UserDict; Hugging Face collators return a BatchEncoding) is
    # a dict batch: it was never moved to the device and split_batch refused it.
    from collections import UserDict

    def to_mapping(items):
        x, y = _pad(items)
        return UserDict(input=x, target=y)

    summary = fit(torch.nn.Linear(6, 2), _VarLen(16), collate_fn=to_mapping,
                  overrides=[*base, "checkpoint.resume=never"])
    assert summary["status"] == "completed", summary


def test_a_plain_pytorch_criterion_is_a_task(tmp_path):
    """``task=nn.CrossEntropyLoss()`` or ``task=F.mse_loss``, the criterion of a plain loop: applied
    to the model's prediction and the batch's target (it got the model as its prediction and
    failed in the first step); cross-entropy takes the classification task's steps."""
    import dist_train
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = x[:, :3].argmax(dim=1)
    runs = {}
    class OwnLoss(torch.nn.Module):  # a plain loop's own criterion module (not an nn.modules.loss._Loss)
        def forward(self, logits, target):
            return F.cross_entropy(logits, target)

    def own_loss(logits, target):
        return F.cross_entropy(logits, target)

    for name, task in (("builtin", "classification"), ("module", torch.nn.CrossEntropyLoss()),
                       ("functional", F.cross_entropy), ("own_module", OwnLoss()), ("own_function", own_loss)):
        torch.manual_seed(0)
        summary = dist_train.fit(torch.nn.Linear(4, 3), TensorDataset(x, y), TensorDataset(x[:16], y[:16]), task=task,
                                 overrides=[*FIT, "data.batch_size=8", "train.max_steps=4", f"run.dir={tmp_path / name}"])
        assert summary["status"] == "completed", summary
        runs[name] = (train_losses(tmp_path / name), summary["eval_loss"])
    for name in ("module", "functional", "own_module", "own_function"):
        assert all(abs(runs[name][0][s] - runs["builtin"][0][s]) < 1e-6 for s in range(1, 5)), (name, runs)
        assert abs(runs[name][1] - runs["builtin"][1]) < 1e-6, (name, runs)
    # A function that can be neither (its first parameter names no prediction) is called as
    # task(model, batch): its failure says so, in the log and in summary.json.
    def ambiguous(a, b):
        return F.cross_entropy(a, b)

    with pytest.raises(dist_train.TrainingFailed, match=r"called as task\(model, batch\).*logits"):
        dist_train.fit(torch.nn.Linear(4, 3), TensorDataset(x, y), task=ambiguous,
                       overrides=[*FIT, "data.batch_size=8", "train.max_steps=2", f"run.dir={tmp_path / 'ambiguous'}"])
    error = json.loads((tmp_path / "ambiguous" / "summary.json").read_text())["error"]
    assert "called as task(model, batch)" in error and "TypeError" in error, error
    # A regression criterion with a target of the prediction's shape.
    t = x.sum(dim=1, keepdim=True)
    summary = dist_train.fit(torch.nn.Linear(4, 1), TensorDataset(x, t), TensorDataset(x[:16], t[:16]), task=F.mse_loss,
                             overrides=[*FIT, "data.batch_size=8", "train.max_steps=4", f"run.dir={tmp_path / 'mse'}"])
    assert summary["status"] == "completed" and summary["eval_loss"] is not None, summary


def test_an_own_optimizer_and_scheduler_resume_exactly_and_bad_ones_stop_before_the_run(tmp_path):
    """An optimizer class (``partial(Adam, lr=...)``) and ``OneCycleLR``: a run stopped at step 4
    and resumed (a new model instance, a new fit) takes the uninterrupted run's steps 5-8 exactly
    (the moments and the schedule's position come back). A factory ``model -> optimizer`` without
    a scheduler trains as the config's optimizer does (``train.schedule`` scales its rate), frozen
    parameters left out. What cannot work is refused by name before any process group."""
    import functools

    import dist_train
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = x[:, :4].argmax(dim=1)
    data = TensorDataset(x, y)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    # OneCycleLR cycles Adam's betas too; MultiStepLR's milestones are a Counter of int keys (JSON
    # turned them into strings: the resumed run never decayed again).
    schedulers = {"onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8),
                  "multistep": lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[6, 7], gamma=0.5)}
    for name, scheduler in schedulers.items():
        own = dict(optimizer=functools.partial(torch.optim.Adam, lr=0.01), scheduler=scheduler)
        common = [*FIT, "data.batch_size=16", "checkpoint.every_steps=4"]
        whole, parts = tmp_path / f"{name}_whole", tmp_path / f"{name}_parts"
        dist_train.fit(model(), data, **own, overrides=[*common, "train.max_steps=8", f"run.dir={whole}"])
        dist_train.fit(model(), data, **own, overrides=[*common, "train.max_steps=4", f"run.dir={parts}"])
        summary = dist_train.fit(model(), data, **own, overrides=[*common, "train.max_steps=8", "checkpoint.resume=auto",
                                                                  f"run.dir={parts}"])
        assert summary["resumed_from_step"] == 4 and summary["steps"] == 8, summary
        ref, resumed = train_losses(whole), train_losses(parts)
        assert all(resumed[s] == ref[s] for s in range(5, 9)), (name, ref, resumed)
        lrs = {r["step"]: r["lr"] for r in read_metrics(whole) if "lr" in r}
        assert {r["step"]: r["lr"] for r in read_metrics(parts) if "lr" in r} == lrs, name
        if name == "onecycle":
            assert max(lrs.values()) == pytest.approx(0.05, rel=0.05) and lrs[8] < lrs[4], lrs
        else:
            assert [lrs[s] for s in (5, 6, 7, 8)] == pytest.approx([0.01, 0.01, 0.005, 0.0025]), lrs

    # A factory over the model, the config's schedule over its rate; the frozen layer stays as it was.
    keys = ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0", "train.weight_decay=0",
            "train.schedule=constant", "model.freeze=[0.*]"]
    frozen = model()[0].weight.detach().clone()
    runs = {}
    for name, extra, kwargs in (("keys", keys, {}),
                                ("factory", keys[4:], {"optimizer": lambda m: torch.optim.SGD(m.parameters(), lr=0.05)})):
        instance = model()
        dist_train.fit(instance, data, **kwargs, overrides=[*FIT, "data.batch_size=16", "train.max_steps=4", *extra,
                                                            f"run.dir={tmp_path / name}"])
        assert torch.equal(instance[0].weight, frozen), name
        runs[name] = train_losses(tmp_path / name)
    assert runs["factory"] == runs["keys"], runs

    bad = [({"optimizer": torch.optim.SGD(model().parameters(), lr=0.1)}, model, "optimizer", "pass that model instance"),
           ({"optimizer": torch.optim.SGD(model().parameters(), lr=0.1)}, model(), "optimizer", "not the model's"),
           ({"optimizer": "sgd"}, model(), "optimizer", "must be a torch.optim.Optimizer"),
           ({"scheduler": torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model().parameters()), 3)}, model(),
            "scheduler", "lambda optimizer: StepLR"),
           ({"scheduler": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt)}, model(), "scheduler",
            "ReduceLROnPlateau steps on a metric"),
           ({"scheduler": lambda opt: opt}, model(), "scheduler", "must return a torch.optim.lr_scheduler"),
           ({"scheduler": lambda opt: torch.optim.lr_scheduler.ChainedScheduler(
               [torch.optim.lr_scheduler.ConstantLR(opt)])}, model(), "train.scheduler_interval", "last_epoch"),
           ({"optimizer": functools.partial(torch.optim.SGD, lr=0.1)}, model(), "train.lr_scale", "param groups")]
    for kwargs, net, key, words in bad:
        overrides = [*FIT, f"run.dir={tmp_path / 'bad'}"] + (["train.lr_scale={2.*: 2}"] if key == "train.lr_scale" else [])
        if key == "train.scheduler_interval":
            overrides.append("train.scheduler_interval=epoch")
        with pytest.raises(dist_train.ConfigError, match=rf"{key}.*{words}"):
            dist_train.fit(net, data, **kwargs, overrides=overrides)
    assert not torch.distributed.is_initialized()


def test_a_schedule_per_epoch_steps_after_each_epoch_and_resumes_mid_epoch(tmp_path):
    """``train.scheduler_interval=epoch``: a plain loop's ``scheduler.step()`` after each epoch (4
    optimizer steps here), for the config's StepLR and for one's own alike; a run stopped in the
    middle of an epoch resumes with the schedule where it was. Cosine (it spans max_steps) is
    refused by name before the run."""
    import dist_train
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x[:, :4].argmax(dim=1)

    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(8, 4)

    epoch = [*FIT, "data.batch_size=16", "train.max_steps=12", "train.optimizer=sgd", "train.lr=0.1",
             "train.weight_decay=0", "train.scheduler_interval=epoch", "train.warmup_steps=0"]
    keys = ["train.schedule=step", "train.step_size=1", "train.gamma=0.5"]
    own = {"scheduler": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}
    for name, extra, kwargs in (("keys", keys, {}), ("own", [], own)):
        dist_train.fit(model(), TensorDataset(x, y), **kwargs, overrides=[*epoch, *extra, f"run.dir={tmp_path / name}"])
        lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / name) if "lr" in r}
        assert lrs == {s: pytest.approx(0.1 * 0.5 ** ((s - 1) // 4)) for s in range(1, 13)}, (name, lrs)
    assert train_losses(tmp_path / "own") == train_losses(tmp_path / "keys")
    # Stopped at step 6 (the middle of the second epoch), resumed to 12.
    run = tmp_path / "resumed"
    for steps, resume in ((6, "never"), (12, "auto")):
        dist_train.fit(model(), TensorDataset(x, y), **own, overrides=[*epoch, f"train.max_steps={steps}",
                                                                        f"checkpoint.resume={resume}", f"run.dir={run}"])
    assert train_losses(run) == train_losses(tmp_path / "own")
    with pytest.raises(dist_train.ConfigError, match="train.scheduler_interval.*cosine spans train.max_steps"):
        dist_train.fit(model(), TensorDataset(x, y), overrides=[*epoch, "train.schedule=cosine", f"run.dir={tmp_path / 'bad'}"])


def test_epochs_set_the_steps_once_the_data_is_known(tmp_path):
    """``train.epochs=3`` over 64 samples in global batches of 16, 2 micro-batches to a step: 6
    optimizer steps, the whole data seen three times, config.yaml and the schedule (cosine spans
    the steps) told; epochs that make no step are refused by name before the run."""
    import yaml

    import dist_train
    from torch.utils.data import TensorDataset

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, x[:, :4].argmax(dim=1))
    run = tmp_path / "epochs"
    summary = dist_train.fit(torch.nn.Linear(8, 4), data, overrides=[
        *FIT, "train.epochs=3", "data.batch_size=16", "train.grad_accum_steps=2", "train.schedule=cosine",
        "train.min_lr_ratio=0", f"run.dir={run}"])
    assert summary["steps"] == 6 and summary["samples_seen"] == 3 * 64, summary
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 6
    lrs = [r["lr"] for r in read_metrics(run) if "lr" in r]
    assert len(lrs) == 6 and lrs[0] == pytest.approx(0.05) and lrs[-1] < 0.01, lrs  # (cosine over 6 steps)
    with pytest.raises(dist_train.ConfigError, match="train.epochs: 1 epoch.*make 0 steps"):
        dist_train.fit(torch.nn.Linear(8, 4), data, overrides=[*FIT, "train.epochs=1", "data.batch_size=32",
                                                                "train.grad_accum_steps=4", f"run.dir={tmp_path / 'bad'}"])


def test_evaluation_and_checkpoints_after_each_epoch(tmp_path):
    """``eval.every_epochs`` / ``checkpoint.every_epochs``: a plain loop's validation (and save)
    after each epoch, at the optimizer step that ends it, also when an optimizer step of 3
    micro-batches straddles two epochs of 4."""
    import dist_train
    from torch.utils.data import TensorDataset

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, x[:, :4].argmax(dim=1))
    for accum, evaluated, saved in ((1, [4, 8, 12], [8, 12]), (3, [2, 3, 4], [3, 4])):
        run = tmp_path / f"accum{accum}"
        dist_train.fit(torch.nn.Linear(8, 4), data, TensorDataset(x[:16], x[:16, :4].argmax(dim=1)), overrides=[
            *FIT, "train.epochs=3", "data.batch_size=16", f"train.grad_accum_steps={accum}", "eval.every_epochs=1",
            "checkpoint.every_epochs=2", "checkpoint.keep_last=0", "logging.every_steps=100", f"run.dir={run}"])
        assert [r["step"] for r in read_metrics(run) if "eval_loss" in r] == evaluated, accum
        assert sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*")) == saved, accum


def test_the_best_evaluations_checkpoint_is_kept_named_and_resumed_as_the_bar(tmp_path):
    """``checkpoint.best_metric=eval_loss``: the checkpoint of each step whose evaluation is the best
    so far is saved (no cadence asks for it here) and named by checkpoints/best.json; keep_last=1
    never prunes it; summary.json's best points at it; a resumed run compares with the best recorded
    before it. A metric the evaluation does not report is refused by name."""
    import dist_train
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = x[:, :4].argmax(dim=1)
    # A held-out set whose labels the model cannot learn from the training data: its loss goes up
    # as training goes on, so the best evaluation is an early one.
    held_out = TensorDataset(x[:32], (y[:32] + 1) % 4)
    common = [*FIT, "data.batch_size=16", "train.lr=0.1", "train.schedule=constant", "eval.every_steps=2",
              "checkpoint.keep_last=1", "checkpoint.best_metric=eval_loss"]
    run = tmp_path / "best"
    summary = dist_train.fit(torch.nn.Linear(8, 4), TensorDataset(x, y), held_out,
                             overrides=[*common, "train.max_steps=8", f"run.dir={run}"])
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r}
    first = min(evals, key=evals.get)
    assert first < 8 and summary["best"]["step"] == first and summary["best"]["mode"] == "min", (evals, summary["best"])
    assert summary["best"]["value"] == pytest.approx(evals[first]), summary["best"]
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["checkpoint"] == f"step_{first:08d}" and Path(summary["best"]["path"]).is_dir()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == sorted({f"step_{first:08d}", "step_00000008"})
    # Resumed to 12 steps, the run dir given by another spelling of its path: the bar is the
    # recorded best, which no later evaluation beats.
    summary = dist_train.fit(torch.nn.Linear(8, 4), TensorDataset(x, y), held_out, overrides=[
        *common, "train.max_steps=12", f"checkpoint.resume={run}/../{run.name}", f"run.dir={run}"])
    assert summary["best"]["step"] == first and (run / "checkpoints" / f"step_{first:08d}").is_dir(), summary["best"]
    from dist_train.checkpoint.weights import load_weights

    assert set(load_weights(summary["best"]["path"])) == {"weight", "bias"}
    # A fresh start in the same run dir forgets that timeline's best (its checkpoints stay).
    summary = dist_train.fit(torch.nn.Linear(8, 4), TensorDataset(x, y), held_out, overrides=[
        *common, "train.max_steps=1", "checkpoint.resume=never", "checkpoint.best_metric=eval_accuracy",
        f"run.dir={run}"])
    assert summary["best"]["step"] == 1 and summary["best"]["metric"] == "eval_accuracy", summary["best"]
    # A metric a built-in task does not report: refused before the run. One a task of one's own
    # does not report: said at its first evaluation, and the run goes on, saving as before.
    with pytest.raises(dist_train.ConfigError, match="checkpoint.best_metric: 'eval_acc' is not among the metrics "
                                                     "task 'classification' evaluates: eval_loss, eval_accuracy"):
        dist_train.fit(torch.nn.Linear(8, 4), TensorDataset(x, y), held_out, overrides=[
            *common, "checkpoint.best_metric=eval_acc", "train.max_steps=2", f"run.dir={tmp_path / 'typo'}"])
    summary = dist_train.fit(torch.nn.Linear(8, 4), TensorDataset(x, y), held_out,
                             task=lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]),
                             overrides=[*common, "checkpoint.best_metric=eval_acc", "train.max_steps=4",
                                        f"run.dir={tmp_path / 'own_typo'}"])
    assert summary["status"] == "completed" and "'eval_acc' is not among" in summary["best"]["error"], summary
    assert (tmp_path / "own_typo" / "checkpoints" / "step_00000004").is_dir()
    with pytest.raises(dist_train.ConfigError, match="checkpoint.best_metric: needs held-out data"):
        dist_train.fit(torch.nn.Linear(8, 4), TensorDataset(x, y), overrides=[*common, f"run.dir={tmp_path / 'none'}"])


def test_metric_names_known_up_front_are_only_the_built_in_tasks_own():
    """A subclass of a built-in task may report other metrics (it is checked when it evaluates);
    eval_bpb is reported only when a token is a byte."""
    from dist_train.config.schema import ConfigError
    from dist_train.train.sources import check_best_metric
    from dist_train.train.tasks import Classification, LanguageModel

    class WithF1(Classification):
        def eval_metrics(self, sums):
            return {**super().eval_metrics(sums), "eval_f1": 0.0}

    check_best_metric("eval_f1", WithF1())
    check_best_metric("eval_bpb", LanguageModel(bytes_per_token=1.0))
    with pytest.raises(ConfigError, match="'eval_bpb' is not among the metrics task 'language_model' evaluates"):
        check_best_metric("eval_bpb", LanguageModel())
    with pytest.raises(ConfigError, match="'eval_f1' is not among"):
        check_best_metric("eval_f1", Classification())


def test_the_bar_of_the_best_is_what_was_saved():
    """A best evaluation whose save failed or was dropped does not raise the bar (nothing better
    than the marked one was kept); marks come in step order; auto mode by the metric's words."""
    from dist_train.checkpoint.best import BestCheckpoint, resolve_mode

    best = BestCheckpoint("eval_loss", "auto", "/nonexistent", rank0=False)
    assert best.improved(2, {"eval_loss": 1.0}) and best.improved(4, {"eval_loss": 0.8})
    best.committed(4)  # (2's pending entry, worse, is dropped with it)
    assert best.protected == 4 and not best.pending
    assert best.improved(6, {"eval_loss": 0.5})
    best.failed(6, best.token(6))
    assert best.improved(8, {"eval_loss": 0.7}) and not best.improved(10, {"eval_loss": 0.75})
    assert not best.improved(12, {"eval_loss": float("nan")})
    # The save of step 14 fails while the final evaluation of that step (found best meanwhile) is
    # pending: that entry stays for the save that follows.
    token = best.token(14)
    assert best.improved(14, {"eval_loss": 0.1})
    best.failed(14, token)
    assert 14 in best.pending
    best.committed(14)
    assert best.protected == 14
    assert [resolve_mode(m, "auto") for m in ("eval_loss", "eval_perplexity", "eval_bpb", "eval_mae", "eval_wer",
                                              "eval_nll", "eval_logloss", "eval_crossentropy", "eval_ce",
                                              "eval_accuracy", "eval_top5_accuracy", "eval_f1", "eval_balance")] == \
        ["min"] * 9 + ["max"] * 4


def test_epochs_count_what_is_left_when_a_run_resumes_with_another_batch(tmp_path):
    """train.epochs=2 over 96 samples: 10 steps of 8, then resumed with batches of 16 (another
    world size's global batch would do the same): 7 steps more, the two epochs exactly."""
    import dist_train
    from torch.utils.data import TensorDataset

    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, x[:, :4].argmax(dim=1))
    run = tmp_path / "run"
    dist_train.fit(torch.nn.Linear(8, 4), data, overrides=[*FIT, "data.batch_size=8", "train.max_steps=10",
                                                            f"run.dir={run}"])
    summary = dist_train.fit(torch.nn.Linear(8, 4), data, overrides=[
        *FIT, "data.batch_size=16", "train.epochs=2", "checkpoint.resume=auto", f"run.dir={run}"])
    assert summary["steps"] == 17 and summary["samples_seen"] == 2 * 96, summary
