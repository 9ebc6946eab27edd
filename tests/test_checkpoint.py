"""Checkpoint building blocks: manifest verification, retention, log trimming, safe loading, RNG
capture, and the all-ranks-agree commit on a real 2-rank gloo group."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from conftest import spawn
from dist_train.checkpoint import decode, layout, retention, storage


def _tree(root, files):
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def _committed_checkpoint(tmp_path, step=5):
    staging = tmp_path / "checkpoints" / layout.staging_name(step)
    _tree(staging, {"meta.json": b"{}", "dcp/__0_0.distcp": os.urandom(4096), "rng/rank_00000.pt": b"x" * 100})
    files = layout.describe_files(str(staging), layout.list_files(str(staging)))
    layout.write_manifest(str(staging), step, files)
    final = tmp_path / "checkpoints" / layout.step_name(step)
    layout.commit(str(staging), str(final))
    return final


def test_manifest_verifies_and_names_each_kind_of_damage(tmp_path):
    ckpt = _committed_checkpoint(tmp_path)
    assert layout.verify(str(ckpt)) == []
    assert layout.read_latest(str(tmp_path / "checkpoints")) == "step_00000005"
    assert not (tmp_path / "checkpoints" / ".staging_step_00000005").exists()

    shard = ckpt / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x01  # one flipped bit: same size, different hash
    shard.write_bytes(bytes(data))
    errors = layout.verify(str(ckpt))
    assert len(errors) == 1 and "dcp/__0_0.distcp" in errors[0] and "corrupt" in errors[0]

    shard.write_bytes(bytes(data[:1000]))  # truncated
    errors = layout.verify(str(ckpt))
    assert len(errors) == 1 and "dcp/__0_0.distcp" in errors[0] and "size 1000" in errors[0]

    (ckpt / "rng" / "rank_00000.pt").unlink()
    assert any("rng/rank_00000.pt: missing" in e for e in layout.verify(str(ckpt)))

    (ckpt / "manifest.json").unlink()
    assert layout.verify(str(ckpt)) == ["no manifest.json (an incomplete or foreign directory)"]


def test_retention_keeps_the_newest_and_never_the_one_just_saved(tmp_path):
    assert retention.to_prune([10, 20, 30, 40], keep_last=2, keep=40) == [10, 20]
    assert retention.to_prune([10, 20, 30, 40], keep_last=1, keep=40) == [10, 20, 30]
    assert retention.to_prune([10, 20, 30, 40], keep_last=0, keep=40) == []
    # A newer directory of another timeline never pushes out the checkpoint just committed.
    assert 20 not in retention.to_prune([10, 20, 90], keep_last=1, keep=20)
    for step in (1, 2, 3):
        _committed_checkpoint(tmp_path, step)
    assert retention.prune(str(tmp_path / "checkpoints"), keep_last=2, keep=3) == ["step_00000001"]
    assert [s for s, _ in layout.committed(str(tmp_path / "checkpoints"))] == [3, 2]


def test_commit_replaces_a_directory_of_an_abandoned_timeline(tmp_path):
    old = _committed_checkpoint(tmp_path, 7)
    (old / "stale").write_text("old timeline")
    new = _committed_checkpoint(tmp_path, 7)
    assert new == old and not (new / "stale").exists() and layout.verify(str(new)) == []
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000007"]


def test_trim_jsonl_drops_records_past_the_resumed_step_and_a_torn_line(tmp_path):
    from dist_train.logging.jsonl import trim_jsonl

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": s / 10} for s in range(1, 8)] + [{"step": 7, "eval_loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')
    assert trim_jsonl(str(path), 5) == 4
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    with open(path, "a") as f:  # a writer appending afterwards continues cleanly
        f.write(json.dumps({"step": 6}) + "\n")
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert trim_jsonl(str(tmp_path / "absent.jsonl"), 3) == 0


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_dcp_loading_never_unpickles_arbitrary_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = str(tmp_path / "dcp")
    storage.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}, "extra": {"lr": 0.5, "betas": (0.9, 0.99)}}, ckpt)
    target = {"model": {"w": torch.zeros(2, 3)}, "extra": {"lr": 0.0, "betas": (0.0, 0.0)}}
    storage.load(target, ckpt)
    assert torch.equal(target["model"]["w"], torch.arange(6.0).reshape(2, 3)) and target["extra"]["lr"] == 0.5
    assert storage.tensor_shapes(ckpt) == {"w": ((2, 3), torch.float32)}

    # A non-tensor leaf holding an object: DCP's default planner would unpickle (and run) it.
    bad = str(tmp_path / "bad_leaf")
    storage.save({"model": {"w": torch.ones(2)}, "extra": {"obj": _Payload()}}, bad)
    with pytest.raises(storage.DCPError, match="UnpicklingError.*posix.system"):
        storage.load({"model": {"w": torch.zeros(2)}, "extra": {"obj": None}}, bad)
    # A crafted .metadata index.
    with open(os.path.join(bad, ".metadata"), "wb") as f:
        pickle.dump(_Payload(), f)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        decode.read_metadata(bad)
    assert not (tmp_path / "PWNED").exists()


def test_the_index_decoder_maps_every_tensor_layout_as_torch_does():
    """``.metadata`` names tensor layouts through ``torch.serialization._get_layout``; the decoder's
    own table (without that function's first-call scan of all of torch) has every one of them."""
    every = {str(v): v for v in torch.__dict__.values() if isinstance(v, torch.layout)}
    assert every and decode._LAYOUTS == every
    assert all(decode._get_layout(name) is torch.serialization._get_layout(name) for name in every)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    from dist_train.env.seed import rng_state, seed_everything, set_rng_state

    seed_everything(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    seed_everything(4)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])

    # Checkpoints before 2026-12-07 hold Python's state as random.getstate()'s tuple of ints.
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert torch.is_tensor(state["python"][1])
    seed_everything(3)
    state["python"] = random.getstate()
    torch.save(state, tmp_path / "old_rng.pt")
    seed_everything(4)
    set_rng_state(torch.load(tmp_path / "old_rng.pt", weights_only=True))
    assert random.random() == expected[0]


def test_identity_names_model_and_dataset_entries():
    from dist_train.checkpoint.restore import identity
    from dist_train.strategy.dcp_state import shape_mismatches

    cfg = {"model": {"name": "mlp", "hidden": 128, "dropout": 0.1, "gpt": {"n_layer": 4}}, "data": {"name": "digits", "batch_size": 8}}
    assert identity(cfg) == {"model.name": "mlp", "model.hidden": 128, "model.gpt.n_layer": 4, "data.name": "digits"}
    msg = shape_mismatches({"a": ((2, 3), None), "b": ((4,), None)}, {"a": (2, 4), "c": (1,)})
    assert "c" in msg and "b" in msg and "a [2, 3] in the checkpoint vs [2, 4] here" in msg


# --- the commit on a real 2-rank group ----------------------------------------------------------

def _failed_rank_aborts_commit(rank: int, world: int, run_dir: str) -> None:
    from dist_train.checkpoint import manager as manager_mod
    from dist_train.checkpoint.manager import CheckpointError, CheckpointManager
    from dist_train.config import load_config, to_dict
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training
    from dist_train.train.state import TrainState
    from dist_train.data.registry import DataInfo

    job = load_config(None, ["strategy.name=ddp", "model.name=mlp", "data.name=digits", "checkpoint.keep_last=0"])
    strategy = build_training(job, detect(), torch.device("cpu"), DataInfo("classification", (1, 8, 8), 10))
    m = CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job), micro_global_batch=2 * 64,
                          grad_accum_steps=1, seed=0)
    try:
        state = TrainState(step=1)
        m.save(state)
        ckpts = os.path.join(run_dir, "checkpoints")
        assert layout.verify(os.path.join(ckpts, "step_00000001")) == []
        # Rank 1 cannot write its part of step 2: no rank may commit it.
        if rank == 1:
            def broken(path, data):
                raise OSError("disk full (injected)")
            manager_mod.layout.write_staged = broken
        state.step = 2
        with pytest.raises(CheckpointError, match="aborted"):
            m.save(state)
        m.group.barrier()
        assert sorted(os.listdir(ckpts)) == ["latest", "step_00000001"], os.listdir(ckpts)
        assert layout.read_latest(ckpts) == "step_00000001"
        # Both ranks verify alike; damage found by either rank's share is reported to both.
        path = os.path.join(ckpts, "step_00000001")
        assert m.restorer.verify(path) == []
        m.group.barrier()
        if rank == 0:
            with open(os.path.join(path, "rng", "rank_00001.pt"), "r+b") as f:
                f.seek(10)
                f.write(b"\xff")
        m.group.barrier()
        errors = m.restorer.verify(path)
        assert len(errors) == 1 and "rng/rank_00001.pt" in errors[0] and "corrupt" in errors[0], errors
    finally:
        m.close()


def test_a_rank_that_fails_to_write_aborts_the_commit_on_every_rank(tmp_path):
    spawn(_failed_rank_aborts_commit, 2, str(tmp_path / "run"))


def _async_failures_are_saved_again(rank: int, world: int, run_dir: str) -> None:
    """checkpoint.async_save + on_save_error=continue: rank 1 fails to prepare a background save.
    Every rank learns it at its next wait (no rank hangs in the commit's collectives); the next
    due save goes ahead, and a failed save of the very last step is made again by finalize."""
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config import load_config, to_dict
    from dist_train.data.registry import DataInfo
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training
    from dist_train.train.state import TrainState

    job = load_config(None, ["strategy.name=ddp", "model.name=mlp", "data.name=digits", "checkpoint.keep_last=0",
                             "checkpoint.async_save=true", "checkpoint.every_steps=2",
                             "checkpoint.on_save_error=continue"])
    strategy = build_training(job, detect(), torch.device("cpu"), DataInfo("classification", (1, 8, 8), 10))
    m = CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job), micro_global_batch=2 * 64,
                          grad_accum_steps=1, seed=0)
    real = strategy.save_checkpoint
    fail = {"now": False}

    def flaky(files, stage):
        if fail["now"] and rank == 1:
            raise RuntimeError("host memory exhausted (injected)")
        return real(files, stage=stage)

    strategy.save_checkpoint = flaky
    ckpts = os.path.join(run_dir, "checkpoints")
    try:
        state = TrainState(step=2)
        fail["now"] = True
        m.maybe_save(state)  # handed to the writer; its failure is reported later
        fail["now"] = False
        state.step = 4
        m.maybe_save(state)  # reports step 2's failure, then saves step 4
        m.wait()
        assert m.stats["failed_saves"] == 1
        state.step = 6
        fail["now"] = True
        m.maybe_save(state)
        fail["now"] = False
        m.finalize(state)  # step 6 failed in the background: saved again here
        assert m.stats["failed_saves"] == 2
        m.group.barrier()
        names = sorted(n for n in os.listdir(ckpts) if n.startswith("step_"))
        assert names == ["step_00000004", "step_00000006"], os.listdir(ckpts)
        assert layout.read_latest(ckpts) == "step_00000006"
        assert all(layout.verify(os.path.join(ckpts, n)) == [] for n in names)
        assert not [n for n in os.listdir(ckpts) if n.startswith(layout.STAGING_PREFIX)]
    finally:
        m.close()


def test_async_save_failures_reach_every_rank_and_the_last_step_is_saved_again(tmp_path):
    spawn(_async_failures_are_saved_again, 2, str(tmp_path / "run"))


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"step_0000", b"step_00000009\n"],
                         ids=["empty", "not-utf8", "torn", "valid"])
def test_latest_is_read_as_a_checkpoint_name_or_nothing(tmp_path, content):
    """``latest`` is not fsynced: after a crash it may be empty or hold anything."""
    (tmp_path / layout.LATEST).write_bytes(content)
    expected = "step_00000009" if content == b"step_00000009\n" else None
    assert layout.read_latest(str(tmp_path)) == expected


def _fsdp_async_save_stages_dtensors(rank: int, world: int, run_dir: str) -> None:
    """FSDP2 parameters are DTensors: an async save stages each local shard into a host buffer
    wrapped in a DTensor of the same spec, and the checkpoint holds the values of the save's step
    although training changes the parameters while it is written."""
    from torch.distributed.tensor import DTensor

    from dist_train.checkpoint.files import Stager
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config import load_config, to_dict
    from dist_train.data.registry import DataInfo
    from dist_train.env.cluster import detect
    from dist_train.strategy import dcp_state
    from dist_train.train.build import build_training
    from dist_train.train.state import TrainState

    job = load_config(None, ["strategy.name=fsdp", "model.name=mlp", "data.name=digits", "checkpoint.async_save=true"])
    strategy = build_training(job, detect(), torch.device("cpu"), DataInfo("classification", (1, 8, 8), 10))
    state = dcp_state.full_state(strategy.model, strategy.optimizer)
    stager = Stager()
    staged = stager.stage(state)
    assert any(isinstance(v, DTensor) for v in state["model"].values())
    for key, value in state["model"].items():
        copy = staged["model"][key]
        if isinstance(value, DTensor):
            assert isinstance(copy, DTensor) and copy._spec == value._spec and copy.shape == value.shape
            assert copy.to_local().data_ptr() != value.to_local().data_ptr()
            assert torch.equal(copy.to_local(), value.to_local())
    stager.close()
    from dist_train.env.faults import Faults

    # The parameters are copied by the writer thread after 0.3 s (slow_staging): the update
    # below must wait for that copy (Strategy.before_update), and the files are written later.
    m = CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job), micro_global_batch=2 * 64,
                          grad_accum_steps=1, seed=0, faults=Faults("slow_staging=0.3,slow_write=0.3"))
    try:
        expected = {k: v.full_tensor().clone() if isinstance(v, DTensor) else v.clone()
                    for k, v in strategy.model.state_dict().items()}
        m.save(TrainState(step=1))  # returns at once
        assert not m._pending.staged.is_set()
        strategy.model(torch.randn(4, 1, 8, 8)).sum().backward()  # FSDP's forward and backward meanwhile
        strategy.before_update()  # what Strategy.step does first
        assert m._pending.staged.is_set() and m._pending.dropped is None  # FSDP changed no shard in place
        with torch.no_grad():
            for p in strategy.model.parameters():
                p.add_(1.0)  # training goes on
        m.wait()
        m.group.barrier()
        saved = storage.load_full_model(os.path.join(run_dir, "checkpoints", "step_00000001", "dcp"))
        assert set(saved) == set(expected)
        for key, value in expected.items():
            assert torch.equal(saved[key], value), key
        # Rank 1 alone changes a sharded parameter in place before the next update (through the
        # DTensor, as a task's weight clipping would): both ranks drop that save alike.
        m.save(TrainState(step=2))
        if rank == 1:
            with torch.no_grad():
                next(strategy.model.parameters()).clamp_(-0.01, 0.01)
        strategy.before_update()
        assert m._pending.dropped is not None, rank
        m.wait()
        m.group.barrier()
        assert m.stats["dropped_saves"] == 1 and "failed_saves" not in m.stats and m._stager.eager
        assert sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_")) \
            == ["step_00000001"]
        assert m.last_step is None  # the end of the run saves again
    finally:
        m.close()


def test_fsdp_async_save_keeps_the_values_of_its_step(tmp_path):
    spawn(_fsdp_async_save_stages_dtensors, 2, str(tmp_path / "run"))


def _ddp_async_save_stages_a_share(rank: int, world: int, run_dir: str) -> None:
    """Under DDP every tensor is replicated: an async save stages on each rank only the tensors it
    writes (about half the bytes each here, every tensor on exactly one rank), and a resume gets
    the whole model and optimizer state of the save's step."""
    import torch.distributed as dist

    from dist_train.checkpoint import files as files_module
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config import load_config, to_dict
    from dist_train.env.cluster import detect
    from dist_train.strategy import build_strategy
    from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory
    from dist_train.train.state import TrainState

    job = load_config(None, ["strategy.name=ddp", "checkpoint.async_save=true", "train.lr=0.1"])

    def built():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        strategy = build_strategy(job.strategy, detect(), torch.device("cpu"), "fp32")
        strategy.setup(model, make_optimizer_factory(job.train), make_scheduler_factory(job.train))
        return model, strategy, CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job),
                                                  micro_global_batch=32, grad_accum_steps=1, seed=0)

    def train_step(strategy):
        torch.manual_seed(rank)  # each rank its own batch: DDP averages the gradients
        batch = torch.randn(16, 8)
        strategy.backward(torch.nn.functional.cross_entropy(strategy.model(batch), torch.randint(0, 3, (16,))))
        strategy.step(0.0)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    model, strategy, m = built()
    try:
        train_step(strategy)  # AdamW state exists
        strategy.sync_buffers()  # (what the save does first: rank 0's BatchNorm statistics)
        expected_model = {k: v.clone() for k, v in model.state_dict().items()}
        expected_optim = [{k: v.clone() for k, v in strategy.optimizer.state[p].items()}
                          for p in strategy.model.parameters()]
        whole = nbytes(expected_model.values()) + nbytes(t for s in expected_optim for t in s.values())
        m.save(TrainState(step=1))
        train_step(strategy)  # waits for the copy, then changes everything
        m.wait()
        mine = torch.tensor([nbytes(m._stager._buffers.values()), len(m._stager._buffers)])
        assert 0.35 * whole < mine[0] < 0.65 * whole, (rank, int(mine[0]), whole)
        dist.all_reduce(mine)
        assert int(mine[0]) == whole and int(mine[1]) == len(expected_model) + sum(map(len, expected_optim))
    finally:
        m.close()
    model2, strategy2, m2 = built()
    try:
        m2.resume(TrainState())
        for key, value in model2.state_dict().items():
            assert torch.equal(value, expected_model[key]), key
        got = [strategy2.optimizer.state[p] for p in strategy2.model.parameters()]
        assert len(got) == len(expected_optim) == 8
        for have, want in zip(got, expected_optim):
            assert have.keys() == want.keys() and all(torch.equal(have[k], want[k]) for k in have)
    finally:
        m2.close()
    # Ranks whose replicated tensors differ (names, shapes or dtypes: stood in for by rank 1's
    # digest) cannot split them: that save is dropped alike on every rank (its shares do not make
    # up the state), and every later save stages everything.
    real = files_module.own_share

    def other_list(state, rank, world):
        share, digest = real(state, rank, world)
        return share, digest + rank

    files_module.own_share = other_list
    try:
        model3, strategy3, m3 = built()
        train_step(strategy3)
        m3.save(TrainState(step=2))
        m3.wait()
        assert not m3._stager.share and m3.stats["dropped_saves"] == 1 and "failed_saves" not in m3.stats
        assert m3.last_step is None  # (the end of a run saves again)
        m3.save(TrainState(step=3))
        m3.wait()
        assert nbytes(m3._stager._buffers.values()) == whole
        m3.group.barrier()
        assert not os.path.exists(os.path.join(run_dir, "checkpoints", "step_00000002"))
        saved = storage.load_full_model(os.path.join(run_dir, "checkpoints", "step_00000003", "dcp"))
        assert sorted(saved) == sorted(model3.state_dict())
    finally:
        files_module.own_share = real
        m3.close()


def test_ddp_async_save_stages_each_replicated_tensor_on_one_rank(tmp_path):
    spawn(_ddp_async_save_stages_a_share, 2, str(tmp_path / "run"))


def test_async_save_copies_buffers_at_once_and_waits_before_the_next_update(tmp_path):
    """An async save copies module buffers (BatchNorm's running statistics change in the forward)
    at once, and parameters and optimizer state on the writer thread while the next forward and
    backward run; the next optimizer step waits for that copy. Here the copy is held back until
    the step has started waiting: the checkpoint must still hold the values of the save's step."""
    import threading

    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config import load_config, to_dict
    from dist_train.env.cluster import detect
    from dist_train.strategy import build_strategy
    from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory
    from dist_train.train.state import TrainState

    job = load_config(None, ["strategy.name=single", "checkpoint.async_save=true", "train.lr=0.1"])
    run_dir = str(tmp_path / "run")

    def built():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 3))
        strategy = build_strategy(job.strategy, detect(), torch.device("cpu"), "fp32")
        strategy.setup(model, make_optimizer_factory(job.train), make_scheduler_factory(job.train))
        manager = CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job), micro_global_batch=32,
                                    grad_accum_steps=1, seed=0)
        return model, strategy, manager

    def optimizer_state(strategy):
        return [{k: v.clone() for k, v in strategy.optimizer.state[p].items()} for p in strategy.model.parameters()]

    model, strategy, m = built()

    def forward_backward():
        batch = torch.randn(32, 8)
        strategy.backward(torch.nn.functional.cross_entropy(strategy.model(batch), torch.randint(0, 3, (32,))))

    forward_backward()
    strategy.step(0.0)  # AdamW state exists
    waiting = threading.Event()
    finish, gate = m._stager.finish, strategy.before_update

    def held_finish():
        assert waiting.wait(60), "the optimizer step never reached its wait"
        finish()

    def observed_gate():
        waiting.set()  # the step has reached its wait: only now may the copy go ahead
        gate()

    m._stager.finish, strategy.before_update = held_finish, observed_gate
    try:
        expected_model = {k: v.clone() for k, v in model.state_dict().items()}
        expected_optim = optimizer_state(strategy)
        m.save(TrainState(step=1))
        assert m._stager.deferred > 0 and not m._pending.staged.is_set()
        forward_backward()  # changes the running statistics: those were copied already
        assert not torch.equal(model[1].running_mean, expected_model["1.running_mean"])
        assert not m._pending.staged.is_set()  # the parameters' copy is still held back
        strategy.step(0.0)  # waits for the copy, then changes parameters and moments
        assert m._pending.staged.is_set()
        assert not torch.equal(model[0].weight, expected_model["0.weight"])
        m.wait()
        assert m.stats["saves"] == 1 and m.stats["blocking_s"] > 0
    finally:
        m.close()
    model2, strategy2, m2 = built()
    try:
        m2.resume(TrainState())
        assert model2.state_dict().keys() == expected_model.keys()
        for key, value in model2.state_dict().items():
            assert torch.equal(value, expected_model[key]), key
        got = optimizer_state(strategy2)
        assert len(got) == len(expected_optim) == 6  # two Linear and the BatchNorm, weight and bias each
        for mine, theirs in zip(got, expected_optim):
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    finally:
        m2.close()


def test_an_async_save_whose_copy_was_changed_in_place_is_dropped_and_later_saves_copy_at_once(tmp_path):
    """A task that clips weights in place (outside the optimizer step) while an async save copies
    them: the save is dropped (not committed, not an error), training goes on, and the next save
    copies everything when it is taken, so its checkpoint holds exactly the values of its step.
    Embeddings with max_norm (renormalised by their forward) are copied at once from the start."""
    import logging

    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config import load_config, to_dict
    from dist_train.env.cluster import detect
    from dist_train.env.faults import Faults
    from dist_train.strategy import build_strategy
    from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory
    from dist_train.train.state import TrainState
    from dist_train.train.step import train_step

    job = load_config(None, ["strategy.name=single", "checkpoint.async_save=true", "train.lr=0.1"])
    torch.manual_seed(0)

    class Clipped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(8, 4, max_norm=0.5)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            with torch.no_grad():
                self.fc.weight.clamp_(-0.3, 0.3)  # WGAN-style clipping, in the forward
            return self.fc(self.embed(x))

    model = Clipped()
    strategy = build_strategy(job.strategy, detect(), torch.device("cpu"), "fp32")
    strategy.setup(model, make_optimizer_factory(job.train), make_scheduler_factory(job.train))
    m = CheckpointManager(job.checkpoint, str(tmp_path / "run"), strategy, config=to_dict(job), micro_global_batch=16,
                          grad_accum_steps=1, seed=0, faults=Faults("slow_staging=0.2"))
    data = iter(lambda: (torch.randint(0, 8, (16,)), torch.randint(0, 3, (16,))), None)
    try:
        train_step(strategy, data, job.train)
        m.save(TrainState(step=1))
        deferred = {"/".join(map(str, src[0])) for src in m._stager._versions}
        assert "model/fc.weight" in deferred and "model/embed.weight" not in deferred  # max_norm: at once
        warnings = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: warnings.append(record.getMessage())
        logging.getLogger("dist_train.checkpoint").addHandler(handler)
        try:
            train_step(strategy, data, job.train)  # the forward clips fc.weight while it is being copied
        finally:
            logging.getLogger("dist_train.checkpoint").removeHandler(handler)
        assert any("checkpoint of step 1 is dropped: model/fc.weight changed in place" in w for w in warnings), warnings
        m.save(TrainState(step=2))  # waits for (and forgives) the dropped one; copies everything now
        assert m._stager.eager and m._stager.deferred == 0
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        train_step(strategy, data, job.train)
        m.wait()
        assert m.stats["dropped_saves"] == 1 and "failed_saves" not in m.stats
        ckpts = tmp_path / "run" / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000002"]
        assert not [p for p in ckpts.iterdir() if p.name.startswith(".staging")]
        saved = storage.load_full_model(str(ckpts / "step_00000002" / "dcp"))
        assert all(torch.equal(saved[k], v) for k, v in expected.items())
        assert m.last_step == 2
    finally:
        m.close()
    assert "before_update" not in strategy.__dict__  # close() takes its hook back


def _clipping_run(tmp_path, faults=""):
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config import load_config, to_dict
    from dist_train.env.cluster import detect
    from dist_train.env.faults import Faults
    from dist_train.strategy import build_strategy
    from dist_train.train.optim import make_optimizer_factory, make_scheduler_factory

    job = load_config(None, ["strategy.name=single", "checkpoint.async_save=true", "train.lr=0.1"])
    torch.manual_seed(0)

    class Clipping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            with torch.no_grad():
                self.fc.weight.clamp_(-0.3, 0.3)
            return self.fc(x)

    strategy = build_strategy(job.strategy, detect(), torch.device("cpu"), "fp32")
    strategy.setup(Clipping(), make_optimizer_factory(job.train), make_scheduler_factory(job.train))
    m = CheckpointManager(job.checkpoint, str(tmp_path / "run"), strategy, config=to_dict(job), micro_global_batch=16,
                          grad_accum_steps=1, seed=0, faults=Faults(faults))
    data = iter(lambda: (torch.randn(16, 4), torch.randint(0, 3, (16,))), None)
    return job, strategy, m, data


def test_a_dropped_last_save_is_saved_again_at_the_end_and_close_drops_an_unchecked_one(tmp_path):
    from dist_train.train.state import TrainState
    from dist_train.train.step import train_step

    job, strategy, m, data = _clipping_run(tmp_path)
    try:
        train_step(strategy, data, job.train)
        m.save(TrainState(step=1))
        train_step(strategy, data, job.train)  # clips while the copy is made: dropped
        expected = {k: v.clone() for k, v in strategy.model.state_dict().items()}
        m.finalize(TrainState(step=2))  # the dropped save was the last one: saved again, at once
        assert m.stats["dropped_saves"] == 1 and m.last_step == 2
        ckpts = tmp_path / "run" / "checkpoints"
        assert layout.read_latest(str(ckpts)) == "step_00000002"
        assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(("step_", ".staging"))) == ["step_00000002"]
        saved = storage.load_full_model(str(ckpts / "step_00000002" / "dcp"))
        assert all(torch.equal(saved[k], v) for k, v in expected.items())
    finally:
        m.close()

    job, strategy, m, data = _clipping_run(tmp_path / "closed")
    train_step(strategy, data, job.train)
    m.save(TrainState(step=1))
    pending = m._pending
    m.close()  # (a run that failed before its next step): the unchecked save is never committed
    assert pending.done.wait(60) and pending.dropped is not None
    assert not (tmp_path / "closed" / "run" / "checkpoints" / "step_00000001").exists()
    assert "before_update" not in strategy.__dict__


def test_json_files_are_standard_json_even_with_a_nan(tmp_path):
    """summary.json's train_loss is NaN when the last step was a skipped non-finite one: Python wrote
    it as NaN, which JSON.parse and strict parsers refuse; it is null now (as in metrics.jsonl)."""
    import json as _json

    path = tmp_path / "summary.json"
    layout.write_json_atomic(str(path), {"train_loss": float("nan"), "nested": {"x": [1.0, float("inf")]}, "n": 3})

    def refuse(constant):
        raise ValueError(f"non-standard JSON: {constant}")

    assert _json.loads(path.read_text(), parse_constant=refuse) == {"train_loss": None, "nested": {"x": [1.0, None]},
                                                                     "n": 3}


def test_a_resume_at_a_smaller_world_size_trims_the_sample_ids_of_the_ranks_it_lacks(tmp_path):
    """debug.record_sample_ids: a run resumed on 1 rank kept rank 1's records past the resumed
    step, an abandoned timeline that a check over every rank's file took for replayed samples."""
    import json

    from dist_train.logging.sample_ids import trim_other_ranks

    for rank in range(3):
        (tmp_path / f"sample_ids.rank{rank}.jsonl").write_text(
            "".join(json.dumps({"step": s, "ids": [rank, s]}) + "\n" for s in range(1, 6)))
    trim_other_ranks(str(tmp_path), 1, 3)

    def steps(rank):
        return [json.loads(line)["step"] for line in (tmp_path / f"sample_ids.rank{rank}.jsonl").read_text().splitlines()]

    assert steps(0) == [1, 2, 3, 4, 5]  # (this run's own rank trims its file itself)
    assert steps(1) == steps(2) == [1, 2, 3]
