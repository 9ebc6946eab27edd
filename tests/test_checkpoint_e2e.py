"""Checkpoints end to end: real torchrun jobs on 2 gloo ranks, killed, corrupted, preempted, resumed.

One uninterrupted reference run (2 ranks x 16, 60 steps, a checkpoint every 15) is shared by every
test; each test runs the same job some other way and compares with it. Step 30 is mid-epoch (an
epoch is 44 steps), so every resume crosses an epoch boundary it did not start in.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from conftest import REPO, clean_env, free_port, read_metrics, read_summary, run_cli, train_losses
from dist_train.checkpoint import layout, storage

pytestmark = pytest.mark.slow  # real torchrun jobs

N, STEPS = 30, 60
COMMON = ["data.name=digits", "model.name=mlp", "data.num_workers=1", "logging.every_steps=1",
          f"train.max_steps={STEPS}", "checkpoint.every_steps=15", "eval.every_steps=0",
          "logging.mlflow.enabled=false", "logging.progress_bar=off"]
DDP2 = [*COMMON, "data.batch_size=16"]
RECORD = ["debug.record_sample_ids=true"]
SLOW = [*RECORD, "debug.faults=step_sleep=0.1"]  # 0.1 s per step: time to act between checkpoints


def torchrun(args: List[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dist_train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)


def wait_until(proc: subprocess.Popen, cond, what: str, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.time() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and everything under it, as a node failure would. torchrun starts each
    worker in a session of its own, so the workers' process groups are killed one by one."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [proc.pid], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    for pgid in {os.getpgid(p) for p in tree if _alive(p)}:
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def latest(run: Path):
    return layout.read_latest(str(run / "checkpoints"))


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return sum(1 for _ in open(path)) if path.exists() else 0


def sample_ids(run: Path) -> Dict[int, List[int]]:
    """step -> sorted dataset indices the step trained on, all ranks together."""
    out: Dict[int, List[int]] = {}
    for f in sorted(run.glob("sample_ids.rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(rec["ids"])
    return {s: sorted(ids) for s, ids in out.items()}


def tensors(ckpt: Path, prefix: str) -> Dict[str, torch.Tensor]:
    return storage.load_tensors(str(ckpt / "dcp"), prefix)


def assert_bitwise(a: Dict[int, float], b: Dict[int, float], steps) -> None:
    diff = [(s, a.get(s), b.get(s)) for s in steps if a.get(s) != b.get(s)]
    assert not diff, f"losses differ at {len(diff)} steps, first: {diff[:3]}"


def assert_close(a: Dict[int, float], b: Dict[int, float], steps, rel: float = 1e-5) -> None:
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
    assert worst < rel, f"worst relative loss difference {worst:.2e}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ) -> Path:
    """The uninterrupted run: 60 steps, 2 ranks, checkpoints at 15/30/45/60 (keep_last 3)."""
    run = tmp_path_factory.mktemp("ckpt") / "reference"
    proc = run_cli([*DDP2, *RECORD, f"run.dir={run}"], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(train_losses(run)) == list(range(1, STEPS + 1))
    return run


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The same command, SIGKILLed (the whole process group) a few steps after the checkpoint at
    step 30 and restarted unchanged. Returns (run dir, a copy of its step-30 checkpoint, facts)."""
    base = tmp_path_factory.mktemp("ckpt")
    run = base / "killed"
    args = [*DDP2, *SLOW, f"run.dir={run}"]
    proc = torchrun(args)
    wait_until(proc, lambda: latest(run) == layout.step_name(N) and logged_steps(run) >= N + 3,
               f"checkpoint {N} and 3 more steps")
    kill_job(proc)
    facts = {"latest_at_kill": latest(run), "logged_at_kill": logged_steps(run)}
    saved = base / "step_30_copy"
    shutil.copytree(run / "checkpoints" / layout.step_name(N), saved)
    again = run_cli(args, nproc=2, timeout=300)
    facts["stderr"] = again.stderr
    assert again.returncode == 0, again.stderr[-4000:]
    return run, saved, facts


def test_sigkill_then_restart_is_bitwise_identical(reference, killed):
    run, _, facts = killed
    assert facts["latest_at_kill"] == "step_00000030" and facts["logged_at_kill"] > N
    assert read_summary(run)["resumed_from_step"] == N
    # metrics.jsonl: the killed process logged past step 30; the restart dropped those lines
    # and logged every step again, once.
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert_bitwise(train_losses(reference), train_losses(run), range(N + 1, STEPS + 1))
    for prefix in ("model.", "optim."):  # final weights and optimizer state, bit for bit
        ref, got = tensors(reference / "checkpoints/step_00000060", prefix), tensors(run / "checkpoints/step_00000060", prefix)
        assert ref.keys() == got.keys() and len(ref) > 0
        assert all(torch.equal(ref[k], got[k]) for k in ref), prefix
    assert sample_ids(run) == sample_ids(reference)  # same samples, in the same steps


def test_ddp_checkpoint_resumes_under_single_process_with_no_sample_replayed(reference, killed, tmp_path, ok):
    _, saved, _ = killed
    run = tmp_path / "single"
    ok(run_cli([*COMMON, *RECORD, "data.batch_size=32", "strategy.name=single", f"checkpoint.resume={saved}",
                f"run.dir={run}"], timeout=300))
    s = read_summary(run)
    assert s["resumed_from_step"] == N and s["world_size"] == 1 and s["samples_seen"] == STEPS * 32
    assert sorted(train_losses(run)) == list(range(N + 1, STEPS + 1))
    assert_close(train_losses(reference), train_losses(run), range(N + 1, STEPS + 1))
    ref_ids, got = sample_ids(reference), sample_ids(run)
    assert got == {s: ref_ids[s] for s in range(N + 1, STEPS + 1)}  # step by step: nothing replayed or skipped
    before = Counter(i for s in range(1, N + 1) for i in sample_ids(killed[0])[s])
    assert before + Counter(i for ids in got.values() for i in ids) == Counter(i for ids in ref_ids.values() for i in ids)


def test_a_resume_with_a_new_learning_rate_and_weight_decay_trains_with_them(reference, killed, tmp_path, ok):
    """The checkpoint's param groups and schedule carry its run's peak lr and weight decay: the
    resumed run's config wins (said in a warning), the schedule's position stays the checkpoint's."""
    _, saved, _ = killed
    run = tmp_path / "new_lr"
    proc = ok(run_cli([*COMMON, "data.batch_size=32", "strategy.name=single", f"checkpoint.resume={saved}",
                       "train.lr=0.01", "train.weight_decay=0.2", f"run.dir={run}"], timeout=300))
    assert "optimizer settings, not the checkpoint's: lr 0.001 -> 0.01, weight_decay 0.01 -> 0.2" in proc.stderr
    lrs = lambda d: {r["step"]: r["lr"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                     if "lr" in r}
    ref, got = lrs(reference), lrs(run)
    assert sorted(got) == list(range(N + 1, STEPS + 1))
    assert all(abs(got[s] - 10 * ref[s]) <= 1e-9 * ref[s] + 1e-15 for s in got), [(s, ref[s], got[s]) for s in got]


@pytest.mark.skipif(not (REPO / "dist_train/strategy/fsdp.py").exists(), reason="no fsdp strategy")
def test_ddp_checkpoint_resumes_under_fsdp_on_two_ranks(reference, killed, tmp_path, ok):
    _, saved, _ = killed
    run = tmp_path / "fsdp"
    ok(run_cli([*DDP2, *RECORD, "strategy.name=fsdp", f"checkpoint.resume={saved}", f"run.dir={run}"],
               nproc=2, timeout=300))
    assert read_summary(run)["resumed_from_step"] == N
    assert_close(train_losses(reference), train_losses(run), range(N + 1, STEPS + 1))
    assert sample_ids(run) == {s: sample_ids(reference)[s] for s in range(N + 1, STEPS + 1)}
    # Its own checkpoint is sharded (DTensor shards per rank); consolidated, it matches the reference.
    ref, got = tensors(reference / "checkpoints/step_00000060", "model."), tensors(run / "checkpoints/step_00000060", "model.")
    assert all(torch.allclose(ref[k], got[k], rtol=1e-4, atol=1e-6) for k in ref)
    # And the other way: the sharded FSDP checkpoint of step 45 resumes in one plain process.
    back = tmp_path / "fsdp_to_single"
    ok(run_cli([*COMMON, *RECORD, "data.batch_size=32", "strategy.name=single", f"run.dir={back}",
                f"checkpoint.resume={run / 'checkpoints' / 'step_00000045'}"], timeout=300))
    assert_close(train_losses(reference), train_losses(back), range(46, STEPS + 1))
    assert sample_ids(back) == {s: sample_ids(reference)[s] for s in range(46, STEPS + 1)}


def test_corrupt_checkpoints_and_a_crash_before_commit_fall_back_to_a_good_one(reference, tmp_path):
    run = tmp_path / "corrupt"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("sample_ids*"))
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000030", "step_00000045", "step_00000060"]
    shard60 = sorted((ckpts / "step_00000060/dcp").glob("*.distcp"))[-1]
    os.truncate(shard60, shard60.stat().st_size - 100)           # a truncated shard
    shard45 = sorted((ckpts / "step_00000045/dcp").glob("*.distcp"))[0]
    with open(shard45, "r+b") as f:                              # one flipped byte, same size
        f.seek(shard45.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    args = [*DDP2, f"run.dir={run}", "checkpoint.keep_last=2"]

    # Resumes from 30, then every rank exits between writing the step-45 shards and the commit.
    crash = run_cli([*args, "debug.faults=after_shards@45"], nproc=2, timeout=300)
    assert crash.returncode != 0
    err = crash.stderr
    assert "step_00000060 is corrupt or incomplete" in err and f"{shard60.relative_to(ckpts / 'step_00000060')}: size" in err
    assert "step_00000045 is corrupt or incomplete" in err and f"{shard45.relative_to(ckpts / 'step_00000045')}: xxh3_128" in err
    assert "resumed from" in err and "step_00000030" in err
    assert (ckpts / ".staging_step_00000045").is_dir()          # written, never committed
    assert latest(run) == "step_00000030"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000030"]
    assert sorted(p.name for p in (ckpts / "set_aside").iterdir()) == ["step_00000045.corrupt", "step_00000060.corrupt"]

    # The same command again: the stale staging dir is removed, 30 is resumed, the run completes.
    again = run_cli(args, nproc=2, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "removed .staging_step_00000045" in again.stderr
    assert read_summary(run)["resumed_from_step"] == N
    assert_bitwise(train_losses(reference), train_losses(run), range(1, STEPS + 1))
    # Retention (keep_last=2): the two newest remain, 30 was pruned.
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000045", "step_00000060"]
    assert sorted(p.name for p in (ckpts / "set_aside").iterdir()) == ["step_00000045.corrupt", "step_00000060.corrupt"]
    assert not list(ckpts.glob(".staging_*")) and latest(run) == "step_00000060"
    assert all(layout.verify(str(ckpts / n)) == [] for n in ("step_00000045", "step_00000060"))


def test_async_save_snapshots_exactly_while_training_continues(reference, tmp_path, ok):
    run = tmp_path / "async"
    # Each copy of the parameters and optimizer state is held back 0.2 s (the next optimizer step
    # must wait for it) and each write 0.5 s more: training must run on meanwhile, and what is
    # written must still be the state of the step the save was taken at.
    ok(run_cli([*DDP2, f"run.dir={run}", "checkpoint.async=true", "debug.faults=slow_staging=0.2,slow_write=0.5"],
               nproc=2, timeout=300))
    stats = read_summary(run)["checkpoint"]
    assert stats["async"] is True and stats["saves"] == 4 and stats["steps_during_writes"] >= 5, stats
    assert "dropped_saves" not in stats and "failed_saves" not in stats, stats
    assert_bitwise(train_losses(reference), train_losses(run), range(1, STEPS + 1))
    assert latest(run) == "step_00000060"  # the final save was waited for before exit
    for step in (30, 45, 60):
        name = layout.step_name(step)
        assert layout.verify(str(run / "checkpoints" / name)) == []
        for prefix in ("model.", "optim."):
            ref, got = tensors(reference / "checkpoints" / name, prefix), tensors(run / "checkpoints" / name, prefix)
            assert all(torch.equal(ref[k], got[k]) for k in ref), (name, prefix)


def test_sigterm_checkpoints_at_the_next_step_and_exits_preempted(reference, tmp_path, ok):
    run = tmp_path / "preempt"
    args = [*DDP2, *SLOW, f"run.dir={run}"]
    proc = torchrun(args)
    wait_until(proc, lambda: logged_steps(run) >= 20, "step 20")
    proc.send_signal(signal.SIGTERM)  # to torchrun only: it forwards SIGTERM to its workers
    out = proc.communicate(timeout=120)[0]
    s = read_summary(run)
    assert s["status"] == "preempted" and s["exit_code"] == 3, (s, out[-3000:])
    stopped = s["steps"]
    assert 20 <= stopped < STEPS and stopped % 15 != 0
    assert latest(run) == layout.step_name(stopped)
    assert layout.verify(str(run / "checkpoints" / layout.step_name(stopped))) == []
    again = ok(run_cli(args, nproc=2, timeout=300))
    assert read_summary(run)["resumed_from_step"] == stopped and read_summary(run)["status"] == "completed"
    assert f"resumed from {run / 'checkpoints' / layout.step_name(stopped)}" in again.stderr
    assert_bitwise(train_losses(reference), train_losses(run), range(1, STEPS + 1))


def test_a_checkpoint_of_another_model_is_refused_by_name(reference, tmp_path):
    run = tmp_path / "mismatch"
    proc = run_cli([*COMMON, "data.batch_size=32", "model.hidden=64",
                    f"checkpoint.resume={reference / 'checkpoints' / 'step_00000030'}", f"run.dir={run}"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.hidden=128" in proc.stderr and "model.hidden=64" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert read_summary(run)["exit_code"] == 2


def test_inspect_and_export_give_weights_plain_pytorch_can_use(reference, tmp_path, capsys):
    from dist_train.checkpoint.__main__ import main

    ckpt = reference / "checkpoints" / "step_00000060"
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    for text in ("step           60", "strategy       ddp", "world_size     2", "dcp/.metadata", "verification   OK"):
        assert text in out
    broken = tmp_path / "step_00000060"
    shutil.copytree(ckpt, broken)
    (broken / "rng" / "rank_00001.pt").write_bytes(b"garbage")
    assert main(["inspect", str(broken)]) == 1
    assert "FAILED" in capsys.readouterr().out

    out_file = tmp_path / "weights.safetensors"
    proc = subprocess.run([sys.executable, "-m", "dist_train.checkpoint", "export", str(ckpt), str(out_file)],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file
    from torch import nn

    class Block(nn.Module):  # the mlp's structure, written out in plain PyTorch
        def __init__(self, i, o):
            super().__init__()
            self.linear = nn.Linear(i, o)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden1, self.hidden2, self.out = Block(64, 128), Block(128, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = torch.relu(self.hidden1.linear(x.flatten(1)))
            return self.out(torch.relu(self.hidden2.linear(x)))

    model = Plain()
    model.load_state_dict(load_file(str(out_file)), strict=True)
    from dist_train.config import load_config
    from dist_train.data import build_datasets

    _, eval_ds, _ = build_datasets(load_config(None, ["data.name=digits"]).data)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(eval_ds.x).double(), eval_ds.y).item()
    # The training run's own final evaluation of its live model, at step 60.
    assert abs(loss - read_summary(reference)["eval_loss"]) < 1e-5, (loss, read_summary(reference)["eval_loss"])
    # A .pt name gets torch.save's format (safetensors bytes under it failed torch.load); another
    # suffix is refused (exit 2) and writes nothing.
    assert main(["export", str(ckpt), str(tmp_path / "weights.pt")]) == 0
    assert all(torch.equal(v, load_file(str(out_file))[k]) for k, v in torch.load(tmp_path / "weights.pt").items())
    assert main(["export", str(ckpt), str(tmp_path / "weights.bin")]) == 2 and not (tmp_path / "weights.bin").exists()
    assert "name the output .safetensors, or .pt / .pth" in capsys.readouterr().err


@pytest.mark.skipif(not (REPO / "dist_train/strategy/deepspeed.py").exists()
                    or importlib.util.find_spec("deepspeed") is None, reason="no deepspeed strategy")
def test_deepspeed_weights_cross_both_ways_and_its_optimizer_state_is_never_loaded_silently(reference, tmp_path, ok):
    ds = tmp_path / "ds"
    # torch-native (DDP) -> DeepSpeed: weights, step, data position, schedule; a fresh optimizer.
    ok(run_cli([*DDP2, "strategy.name=deepspeed", "checkpoint.load_optimizer=false", "checkpoint.every_steps=1",
                "train.max_steps=32", f"checkpoint.resume={reference / 'checkpoints' / 'step_00000030'}",
                f"run.dir={ds}"], nproc=2, timeout=300))
    ds_losses = train_losses(ds)
    assert sorted(ds_losses) == [31, 32] and read_summary(ds)["resumed_from_step"] == N
    assert_close(train_losses(reference), ds_losses, [31])  # step 31's forward runs on the loaded weights
    assert json.loads((ds / "checkpoints/step_00000031/meta.json").read_text())["kind"] == "native"

    # DeepSpeed -> single: refused unless the optimizer state may be left behind ...
    single = [*COMMON, "data.batch_size=32", "train.max_steps=32",
              f"checkpoint.resume={ds / 'checkpoints' / 'step_00000031'}"]
    refused = run_cli([*single, f"run.dir={tmp_path / 'refused'}"], timeout=300)
    assert refused.returncode == 2 and "checkpoint.load_optimizer=false" in refused.stderr, refused.stderr[-3000:]
    # ... then the engine's full fp32 weights load: step 32 starts from the same model.
    ok(run_cli([*single, "checkpoint.load_optimizer=false", f"run.dir={tmp_path / 'single'}"], timeout=300))
    assert_close(ds_losses, train_losses(tmp_path / "single"), [32])


def test_a_dataloader_worker_stuck_in_fork_on_one_rank_is_restarted_and_the_resume_loses_nothing(
        reference, tmp_path, ok):
    """CPython 3.8-3.11 can leave a DataLoader worker deadlocked inside fork() (seen in CI: a rank
    waiting for a first batch that never came, its peer in an all-reduce). Rank 1's first worker
    stays in fork(); the job kills it, starts the workers again from the resume point, and trains
    the same samples as the uninterrupted run."""
    run = tmp_path / "fork_hang"
    proc = ok(run_cli([*DDP2, *RECORD, "train.max_steps=33", "debug.faults=worker_fork_hang@:1",
                       "data.worker_start_timeout_s=3", f"checkpoint.resume={reference / 'checkpoints' / 'step_00000030'}",
                       f"run.dir={run}"], nproc=2, timeout=300))
    assert "rank 1: DataLoader worker(s) [0]" in proc.stderr and "attempt 2 of 3" in proc.stderr, proc.stderr[-3000:]
    assert "stuck inside fork()" in proc.stderr
    ids, expected = sample_ids(run), sample_ids(reference)
    assert sorted(ids) == [31, 32, 33] and all(ids[s] == expected[s] for s in ids)
    assert_bitwise(train_losses(reference), train_losses(run), [31])  # the loaded weights, the same batch


def test_every_ranks_rng_streams_resume_exactly(tmp_path, ok):
    """With dropout each rank draws from its torch RNG every step: a resume is bitwise exact only
    if every rank's generator state comes back (the reference run above draws no random numbers)."""
    args = [*DDP2, "model.dropout=0.3", "train.max_steps=20", "checkpoint.every_steps=10"]
    ref = tmp_path / "dropout_ref"
    ok(run_cli([*args, f"run.dir={ref}"], nproc=2, timeout=300))
    run = tmp_path / "dropout_resumed"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step_00000020")  # as if killed after the checkpoint at 10
    ok(run_cli([*args, f"run.dir={run}"], nproc=2, timeout=300))
    assert read_summary(run)["resumed_from_step"] == 10
    assert_bitwise(train_losses(ref), train_losses(run), range(1, 21))


def test_zero3_native_checkpoint_resumes_bitwise(tmp_path, ok):
    """DeepSpeed ZeRO-3 partitions parameters too: its own checkpoint, saved at step 4 of 8 and
    resumed on the same world size, continues with bitwise identical losses."""
    args = [*DDP2, "strategy.name=deepspeed", "strategy.zero_stage=3", "train.max_steps=8",
            "checkpoint.every_steps=4"]
    ref = tmp_path / "z3_ref"
    ok(run_cli([*args, f"run.dir={ref}"], nproc=2, timeout=300))
    assert json.loads((ref / "checkpoints/step_00000004/meta.json").read_text())["kind"] == "native"
    run = tmp_path / "z3_resumed"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step_00000008")  # as if killed after the checkpoint at 4
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    ok(run_cli([*args, f"run.dir={run}"], nproc=2, timeout=300))
    assert read_summary(run)["resumed_from_step"] == 4
    assert_bitwise(train_losses(ref), train_losses(run), range(1, 9))

    # The engine's checkpoint carries its run's peak lr and weight decay too: a resume with new
    # ones trains with them (the schedule's position stays the checkpoint's), as under torch.
    new = tmp_path / "z3_new_lr"
    shutil.copytree(ref, new)
    shutil.rmtree(new / "checkpoints" / "step_00000008")
    (new / "checkpoints" / "latest").write_text("step_00000004\n")
    proc = ok(run_cli([*args, "train.lr=0.01", "train.weight_decay=0.2", f"run.dir={new}"], nproc=2, timeout=300))
    assert "optimizer settings, not the checkpoint's: lr 0.001 -> 0.01, weight_decay 0.01 -> 0.2" in proc.stderr
    lrs = lambda d: {r["step"]: r["lr"] for r in read_metrics(d) if "lr" in r}
    before, after = lrs(ref), lrs(new)
    assert all(after[s] == before[s] for s in range(1, 5))
    assert all(abs(after[s] - 10 * before[s]) <= 1e-9 * before[s] for s in range(5, 9)), (before, after)
