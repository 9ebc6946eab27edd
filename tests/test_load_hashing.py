"""A resume hashes the DCP shard files while it loads them (each byte read once), not before:
the archive reader that makes this possible, and what happens when a shard turns out corrupt
only once it is being loaded (single process, and FSDP on 2 gloo ranks)."""
from __future__ import annotations

import contextlib
import io
import os
import zipfile

import pytest
import torch

from conftest import spawn
from dist_train.checkpoint import checksum, decode, digest, layout, storage


def _archive(tensor, crc):
    buf = io.BytesIO()
    if crc:
        torch.save(tensor, buf)
    else:
        with storage._no_zip_crc():
            torch.save(tensor, buf)
    return buf.getvalue()


@pytest.mark.parametrize("crc", [False, True], ids=["ours", "torch.save"])
def test_sequential_reader_decodes_torch_save_archives_and_hashes_every_byte(tmp_path, crc):
    tensors = [torch.randn(700, 500), torch.arange(5), torch.empty(0), torch.randn(300, 400).to(torch.bfloat16),
               torch.randn(40, 30).t(), torch.tensor(3.5, dtype=torch.float64)]
    for tensor in tensors:
        raw = _archive(tensor, crc)
        path = tmp_path / "f.bin"
        path.write_bytes(b"head" + raw + b"tail")
        with open(path, "rb") as stream:
            reader = checksum.HashingReader(stream)
            reader.skip_to(4)
            got = decode.read_sequential(reader, len(raw))
            assert reader.pos == 4 + len(raw)
            whole = reader.finish()
        assert whole == checksum.hash_file(str(path))
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and got.stride() == tensor.stride()
        assert torch.equal(got, tensor)


def test_sequential_reader_refuses_what_is_not_a_plain_stored_archive(tmp_path):
    raw = _archive(torch.randn(100, 100), crc=False)
    # The same records, deflated: not the plain form (the caller then decodes it another way).
    deflated = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(_archive(torch.randn(100, 100), crc=True))) as src, \
            zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    broken_directory = bytearray(raw)
    broken_directory[raw.rfind(b"PK\x01\x02") + 10] ^= 0xFF  # a central directory entry's method
    pickled_code = io.BytesIO()
    with storage._no_zip_crc():
        torch.save({"not": "a tensor"}, pickled_code)
    for bad in (deflated.getvalue(), bytes(broken_directory), raw[:-30], pickled_code.getvalue()):
        path = tmp_path / "bad.bin"
        path.write_bytes(bad)
        with open(path, "rb") as stream:
            with pytest.raises((decode.NotPlain, EOFError)):
                decode.read_sequential(checksum.HashingReader(stream), len(bad))


@pytest.mark.parametrize("case", ["channels_last", "transposed", "tied"])
def test_items_laid_out_unlike_their_destination_load_through_a_copy(tmp_path, case):
    """A large item is read straight into its destination only when its pickle describes exactly
    that tensor: a stored layout other than the destination's (an async save's staged copy of a
    channels_last 1x1 convolution has default strides; a stored transposed tensor), or a
    destination two entries share (tied weights), take a new tensor and a copy."""
    dcp_dir = str(tmp_path / "dcp")
    if case == "channels_last":
        stored = {"w": torch.randn(512, 512, 1, 1)}  # (strides 512, 1, 1, 1)
        dest = {"w": torch.zeros(512, 512, 1, 1).to(memory_format=torch.channels_last)}
    elif case == "transposed":
        stored = {"w": torch.randn(600, 500).t()}
        dest = {"w": torch.zeros(500, 600)}
    else:
        stored = {"a": torch.randn(600, 500), "b": torch.randn(600, 500)}  # (saved untied)
        shared = torch.zeros(600, 500)
        dest = {"a": shared, "b": shared}
    storage.save(stored, dcp_dir)
    names = [n for n in os.listdir(dcp_dir) if n.endswith(".distcp")]
    hashed = storage.load(dest, dcp_dir, expected={n: checksum.hash_file(os.path.join(dcp_dir, n)) for n in names},
                          adopt=case == "tied")
    assert hashed == set(names)
    if case == "tied":  # each entry loaded (handed over whole), nothing read into the shared memory
        assert torch.equal(dest["a"], stored["a"]) and torch.equal(dest["b"], stored["b"])
        assert not shared.any()
    else:
        assert torch.equal(dest["w"], stored["w"])


@pytest.mark.parametrize("extra", [4096, -8])
def test_a_data_record_of_another_size_than_its_pickle_says_is_never_read_into_the_destination(tmp_path, extra):
    """A crafted (or damaged) archive whose tensor record is longer or shorter than the tensor its
    pickle describes: nothing is written into (or past) the destination's memory."""
    import numpy as np

    buf = io.BytesIO()
    torch.save(torch.zeros(4), buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, b"\x41" * (16 + extra) if info.filename.endswith("/data/0")
                         else src.read(info.filename))
    raw = out.getvalue()
    path = tmp_path / "item.bin"
    path.write_bytes(raw)
    memory = np.full(2048, 7.0, dtype=np.float32)  # the destination, and what lies after it
    into = torch.from_numpy(memory[:4])
    into.fill_(-1.0)
    with open(path, "rb") as stream:
        try:
            decode.read_sequential(checksum.HashingReader(stream), len(raw), into)
        except (decode.NotPlain, EOFError):
            pass
    assert (memory[:4] == -1.0).all() and (memory[4:] == 7.0).all()


def _counting_small_items(monkeypatch):
    """Start with no learned layouts; returns the list of (dtype, shape) of every small item that
    is decoded from memory (not read straight into its destination)."""
    monkeypatch.setattr(decode, "_layouts", {})
    decoded = []
    real = decode.small_item

    def counting(data, into=None):
        tensor = real(data, into)
        decoded.append((tensor.dtype, tuple(tensor.shape)))
        return tensor

    monkeypatch.setattr(decode, "small_item", counting)
    monkeypatch.setattr(storage, "small_item", counting)
    return decoded


@pytest.mark.parametrize("form", ["ours", "torch.save", "serialization id"])
def test_small_items_are_read_into_their_destinations_and_items_of_other_forms_still_load(tmp_path, form,
                                                                                          monkeypatch):
    """The first small item of each layout is decoded from memory, and its archive's bytes around
    the data are learned; a later item of that layout with the same bytes there is read straight
    into its destination. One that differs (a stock DCP writer's, with zip CRC32s: another head;
    a tensor whose bytes start with ``PK\\x07\\x08``: torch writes another serialization id, another
    tail) is decoded from its bytes and still loads exactly, hashed all the same."""
    import torch.distributed.checkpoint as dcp

    decoded = _counting_small_items(monkeypatch)

    def load(dcp_dir, stored):
        dest = {k: torch.zeros_like(v) for k, v in stored.items()}
        places = {k: v.data_ptr() for k, v in dest.items()}
        names = [n for n in os.listdir(dcp_dir) if n.endswith(".distcp")]
        decoded.clear()
        hashed = storage.load(dest, dcp_dir, expected={n: checksum.hash_file(os.path.join(dcp_dir, n)) for n in names})
        assert hashed == set(names)
        assert all(torch.equal(dest[k], stored[k]) and dest[k].dtype == stored[k].dtype for k in stored)
        assert {k: v.data_ptr() for k, v in dest.items()} == places  # (read into the destinations)
        return list(decoded)

    def state():
        return {"w": torch.randn(30, 20), "b": torch.randn(20).to(torch.bfloat16), "n": torch.tensor(7)}

    first = state()
    storage.save(first, str(tmp_path / "first"))
    assert sorted(load(str(tmp_path / "first"), first), key=str) == sorted(
        [(torch.float32, (30, 20)), (torch.bfloat16, (20,)), (torch.int64, ())], key=str)
    second, dcp_dir = state(), str(tmp_path / "second")
    if form == "serialization id":
        second["w"].view(-1).view(torch.uint8)[:4] = torch.tensor(list(b"PK\x07\x08"), dtype=torch.uint8)
    if form == "ours":
        storage.save(second, dcp_dir)
    else:  # (DCP's own writer: torch.save per item, with CRC32s, or without them as ours writes)
        with contextlib.nullcontext() if form == "torch.save" else storage._no_zip_crc():
            dcp.save(second, storage_writer=dcp.FileSystemWriter(dcp_dir, sync_files=False, thread_count=1),
                     no_dist=True)
    again = load(dcp_dir, second)
    if form == "ours":
        assert again == []
    elif form == "torch.save":
        assert len(again) == 3  # (every head differs: CRC32s)
    else:
        assert again == [(torch.float32, (30, 20))]  # (read into its destination, then its tail differed)


def _setup(run_dir, strategy_name="single", overrides=()):
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.config import load_config, to_dict
    from dist_train.data.registry import DataInfo
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training

    # hidden 600: the largest items (600 x 600 floats) are over 1 MB and take the sequential reader
    job = load_config(None, [f"strategy.name={strategy_name}", "model.name=mlp", "model.hidden=600",
                             "data.name=digits", "checkpoint.keep_last=5", *overrides])
    torch.manual_seed(0)
    strategy = build_training(job, detect(), torch.device("cpu"), DataInfo("classification", (1, 8, 8), 10))
    strategy.model(torch.randn(4, 1, 8, 8)).sum().backward()
    strategy.step(1.0)  # the optimizer state exists
    manager = CheckpointManager(job.checkpoint, run_dir, strategy, config=to_dict(job), micro_global_batch=64,
                                grad_accum_steps=1, seed=0)
    return strategy, manager


def _weights(strategy):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
            for k, v in strategy.model.state_dict().items()}


def _save_two(strategy, manager):
    """Checkpoints of steps 1 and 2 with different weights; the weights of each."""
    from dist_train.train.state import TrainState

    saved = {}
    for step in (1, 2):
        with torch.no_grad():
            for p in strategy.model.parameters():
                p.add_(step)
        manager.save(TrainState(step=step))
        saved[step] = _weights(strategy)
    digest.wait()  # (rank 0's background SHA-256 pass reads the files: not while a test counts reads)
    with torch.no_grad():
        for p in strategy.model.parameters():
            p.zero_()
    return saved


def _record_hashing(monkeypatch):
    """[(checkpoint, manifest path)] of every file hashed by a verification pass from now on."""
    hashed = []
    real = layout.check_hashes
    monkeypatch.setattr(layout, "check_hashes",
                        lambda ckpt, files, rels: hashed.extend((ckpt, r) for r in rels) or real(ckpt, files, rels))
    return hashed


def _saved_run(tmp_path):
    """A single-process run dir with checkpoints of steps 1 and 2: (run dir, strategy, manager,
    the weights of each step)."""
    run_dir = str(tmp_path / "run")
    strategy, manager = _setup(run_dir)
    try:
        return run_dir, strategy, manager, _save_two(strategy, manager)
    except BaseException:
        manager.close()
        raise


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _ckpt(run_dir, step):
    return os.path.join(run_dir, "checkpoints", layout.step_name(step))


def test_a_shard_found_corrupt_while_loading_falls_back_to_the_previous_checkpoint(tmp_path, monkeypatch):
    from dist_train.train.state import TrainState

    run_dir, strategy, manager, saved = _saved_run(tmp_path)
    try:
        shard = os.path.join(_ckpt(run_dir, 2), "dcp", "__0_0.distcp")
        _flip(shard, os.path.getsize(shard) // 2)  # inside a tensor's bytes: it decodes, the checksum fails
        hashed_before = _record_hashing(monkeypatch)
        state = TrainState()
        assert manager.resume(state) == _ckpt(run_dir, 1) and state.step == 1
        # Step 2's shard was never hashed before its load (the load hashed it); step 1, the
        # fallback, was verified whole first.
        assert (_ckpt(run_dir, 2), "dcp/__0_0.distcp") not in hashed_before
        assert (_ckpt(run_dir, 2), "meta.json") in hashed_before
        assert (_ckpt(run_dir, 1), "dcp/__0_0.distcp") in hashed_before
        problems = manager.restorer.unusable[_ckpt(run_dir, 2)]
        assert len(problems) == 1 and problems[0].startswith("dcp/__0_0.distcp: xxh3_128 ") and "corrupt" in problems[0]
        got = _weights(strategy)
        assert all(torch.equal(got[k], saved[1][k]) for k in saved[1])
        names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
        assert names == ["latest", "set_aside", "step_00000001"], names
        assert os.listdir(os.path.join(run_dir, "checkpoints", "set_aside")) == ["step_00000002.corrupt"]
    finally:
        manager.close()


def test_an_intact_resume_reads_the_shards_once_and_loads_them_exactly(tmp_path, monkeypatch):
    from dist_train.train.state import TrainState

    run_dir, strategy, manager, saved = _saved_run(tmp_path)
    try:
        optim = {(i, k): v.clone() for i, st in strategy.optimizer.state_dict()["state"].items() for k, v in st.items()}
        places = {(i, k): v.data_ptr() for i, st in strategy.optimizer.state_dict()["state"].items()
                  for k, v in st.items()}
        opened = []
        real_open = open

        def counting_open(path, *args, **kwargs):
            if str(path).endswith((".distcp", ".metadata")):
                opened.append(os.path.basename(str(path)))
            return real_open(path, *args, **kwargs)

        decoded = _counting_small_items(monkeypatch)
        monkeypatch.setattr("builtins.open", counting_open)
        assert manager.resume(TrainState()) == _ckpt(run_dir, 2)
        monkeypatch.undo()
        # The first small item of each layout is decoded from memory; the others are read straight
        # into their destinations (see the test above).
        assert len(decoded) == len(set(decoded)) == 5, decoded
        assert opened.count("__0_0.distcp") == 1  # one read of the shard: no verification pass before it
        # DCP's index: hashed by the verification, then parsed once (the checks and the load share it).
        assert opened.count(".metadata") == 2 and len(opened) == 3
        got = _weights(strategy)
        assert all(torch.equal(got[k], saved[2][k]) for k in saved[2])
        after = {(i, k): v for i, st in strategy.optimizer.state_dict()["state"].items() for k, v in st.items()}
        assert after.keys() == optim.keys() and all(torch.equal(after[k], optim[k]) for k in optim)
        # Every item, small or large, was read straight into the tensor it loads into (no new
        # allocation, no copy).
        assert len(places) == 18 and all(after[k].data_ptr() == ptr for k, ptr in places.items())
    finally:
        manager.close()


def test_an_item_the_sequential_reader_refuses_is_decoded_another_way_and_still_hashed(tmp_path, monkeypatch):
    from dist_train.train.state import TrainState

    run_dir, strategy, manager, saved = _saved_run(tmp_path)
    try:
        refused = []

        def refuse(reader, length, into=None):  # gives up part-way, as on an archive of another form
            reader.read(100)
            refused.append(length)
            raise decode.NotPlain("not the plain form (test)")

        monkeypatch.setattr(storage, "read_sequential", refuse)
        assert manager.resume(TrainState()) == _ckpt(run_dir, 2)
        assert len(refused) == 3 and not manager.restorer.unusable  # the three 600 x 600 items
        got = _weights(strategy)
        assert all(torch.equal(got[k], saved[2][k]) for k in saved[2])
        # ... and a byte flipped after the point where it gave up is still caught.
        _flip(os.path.join(_ckpt(run_dir, 2), "dcp", "__0_0.distcp"), 500_000)
        assert manager.resume(TrainState()) == _ckpt(run_dir, 1)
        assert "dcp/__0_0.distcp: xxh3_128" in manager.restorer.unusable[_ckpt(run_dir, 2)][0]
    finally:
        manager.close()


def test_a_damaged_archive_header_is_reported_as_corruption_and_with_nothing_older_the_run_stops(tmp_path):
    from dist_train.checkpoint.restore import CheckpointError, CheckpointRefused
    from dist_train.train.state import TrainState

    run_dir = str(tmp_path / "run")
    strategy, manager = _setup(run_dir)
    try:
        _save_two(strategy, manager)
        for step in (1, 2):
            _flip(os.path.join(_ckpt(run_dir, step), "dcp", "__0_0.distcp"), 1)  # a zip signature: decoding fails
    finally:
        manager.close()
    # Named explicitly: refused, as when the damage is found before loading.
    strategy, manager = _setup(run_dir, overrides=[f"checkpoint.resume={_ckpt(run_dir, 2)}"])
    try:
        with pytest.raises(CheckpointRefused, match=r"does not verify: dcp/__0_0.distcp: xxh3_128 .*corrupt"):
            manager.resume(TrainState())
    finally:
        manager.close()
    # auto: step 2 fails while loading, step 1 fails its verification: the run stops (the model
    # may hold part of step 2) and moves nothing (a passing read error looks the same), every
    # rerun stops alike, and only checkpoint.resume=never starts from scratch.
    ckpts = os.path.join(run_dir, "checkpoints")
    before = sorted(os.listdir(ckpts))
    for _ in range(2):
        strategy, manager = _setup(run_dir)
        try:
            with pytest.raises(CheckpointError, match=r"step_00000002 is corrupt \(dcp/__0_0.distcp: xxh3_128 "
                                                      r".*nothing was moved or deleted.*checkpoint.resume=never"):
                manager.resume(TrainState())
            assert sorted(os.listdir(ckpts)) == before == ["latest", "step_00000001", "step_00000002"]
        finally:
            manager.close()
    strategy, manager = _setup(run_dir, overrides=["checkpoint.resume=never"])
    try:
        state = TrainState()
        assert manager.resume(state) is None and state.step == 0
    finally:
        manager.close()


def test_shard_files_the_load_did_not_read_whole_are_hashed_after_it(tmp_path, monkeypatch):
    """A strategy may load through a reader that does not hash (DeepSpeed reads DCP weights with
    its own call): the deferred shards it did not read whole are hashed after the load."""
    from dist_train.checkpoint.files import CheckpointFiles
    from dist_train.train.state import TrainState

    run_dir, strategy, manager, saved = _saved_run(tmp_path)
    try:
        _flip(os.path.join(_ckpt(run_dir, 2), "dcp", "__0_0.distcp"), 100_000)
        monkeypatch.setattr(CheckpointFiles, "read_state",  # (hashes nothing)
                            lambda self, state, adopt=False: storage.load(state, self.dcp_dir, self.group,
                                                                          adopt=adopt))
        assert manager.resume(TrainState()) == _ckpt(run_dir, 1)
        assert "dcp/__0_0.distcp: xxh3_128" in manager.restorer.unusable[_ckpt(run_dir, 2)][0]
        got = _weights(strategy)
        assert all(torch.equal(got[k], saved[1][k]) for k in saved[1])
    finally:
        manager.close()


def test_a_resume_that_needs_little_of_a_shard_hashes_it_after_the_load(tmp_path, monkeypatch):
    """checkpoint.load_optimizer=false reads the model's items only (a third of the shard): the
    shard is not read whole during the load but hashed after it, and its damage still found."""
    from dist_train.train.state import TrainState

    run_dir, _strategy, manager, _weights = _saved_run(tmp_path)
    manager.close()
    _flip(os.path.join(_ckpt(run_dir, 2), "dcp", "__0_0.distcp"), 10_000)
    strategy, manager = _setup(run_dir, overrides=["checkpoint.load_optimizer=false"])
    hashed_after = _record_hashing(monkeypatch)
    try:
        assert manager.resume(TrainState()) == _ckpt(run_dir, 1)
        assert (_ckpt(run_dir, 2), "dcp/__0_0.distcp") in hashed_after  # (by check_rest, after the load)
        assert "dcp/__0_0.distcp: xxh3_128" in manager.restorer.unusable[_ckpt(run_dir, 2)][0]
    finally:
        manager.close()


def test_a_damaged_item_header_in_a_shard_read_in_part_falls_back_like_any_damage(tmp_path):
    """load_optimizer=false reads only the model's items of the shard, unhashed: a flipped byte in
    one of their zip headers fails to decode before ``check_rest`` could hash the file. The file is
    hashed then, so the damage is corruption (the previous checkpoint is loaded, the damaged one
    moved aside), not a load error that every rerun would repeat."""
    from dist_train.checkpoint import decode
    from dist_train.train.state import TrainState

    run_dir, _strategy, manager, _weights = _saved_run(tmp_path)
    manager.close()
    dcp_dir = os.path.join(_ckpt(run_dir, 2), "dcp")
    stored = decode.read_metadata(dcp_dir).storage_data
    info = next(v for k, v in stored.items() if k.fqn.startswith("model.") and k.fqn.endswith("weight"))
    _flip(os.path.join(dcp_dir, info.relative_path), info.offset + 1)  # the item's zip signature
    strategy, manager = _setup(run_dir, overrides=["checkpoint.load_optimizer=false"])
    try:
        assert manager.resume(TrainState()) == _ckpt(run_dir, 1)
        assert f"dcp/{info.relative_path}: xxh3_128" in manager.restorer.unusable[_ckpt(run_dir, 2)][0]
    finally:
        manager.close()
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["latest", "set_aside", "step_00000001"]
    assert os.listdir(os.path.join(run_dir, "checkpoints", "set_aside")) == ["step_00000002.corrupt"]


def _fsdp_corrupt_shard_of_one_rank(rank: int, world: int, run_dir: str) -> None:
    """FSDP2 on 2 ranks: rank 1's shard file of the newest checkpoint is damaged. Rank 1 finds it
    while loading; both ranks fall back to the previous checkpoint alike and hold its values."""
    from dist_train.train.state import TrainState

    strategy, manager = _setup(run_dir, "fsdp")
    try:
        saved = _save_two(strategy, manager)
        manager.group.barrier()
        if rank == 0:
            shard = os.path.join(_ckpt(run_dir, 2), "dcp", "__1_0.distcp")
            _flip(shard, os.path.getsize(shard) // 2)
        manager.group.barrier()
        state = TrainState()
        assert manager.resume(state) == _ckpt(run_dir, 1) and state.step == 1, rank
        got = _weights(strategy)
        assert all(torch.equal(got[k], saved[1][k]) for k in saved[1]), rank
        assert "dcp/__1_0.distcp: xxh3_128" in manager.restorer.unusable[_ckpt(run_dir, 2)][0]
        manager.group.barrier()
    finally:
        manager.close()


def test_fsdp_ranks_agree_on_a_shard_found_corrupt_while_loading(tmp_path):
    spawn(_fsdp_corrupt_shard_of_one_rank, 2, str(tmp_path / "run"))


@pytest.mark.parametrize("hashed", [False, True])
def test_read_state_fills_the_callers_tensors_in_place_unless_it_allows_adoption(tmp_path, hashed):
    """``storage.load`` / ``CheckpointFiles.read_state`` fill the state dict's tensors in place, as
    ``dcp.load`` does: a strategy of a user's that reads into ``model.state_dict()`` gets its
    parameters restored, and two entries of one tensor stay one filled tensor. Only a caller that
    takes the values from the dict afterwards (``adopt=True``: the built-in strategies) lets a loaded
    tensor replace an entry."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = str(tmp_path / "ckpt")
    storage.save({"model": model.state_dict(), "a": saved["weight"], "b": saved["weight"] * 2}, ckpt)

    def expected():
        return {n: checksum.hash_file(os.path.join(ckpt, n)) for n in os.listdir(ckpt) if n.endswith(".distcp")} \
            if hashed else None

    for adopt in (False, True):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        tied = torch.zeros(3, 4)
        state = {"model": model.state_dict(), "a": tied, "b": torch.zeros(3, 4)}
        storage.load(state, ckpt, expected=expected(), adopt=adopt)
        assert all(torch.equal(state["model"][k], v) for k, v in saved.items())
        assert torch.equal(state["a"], saved["weight"]) and torch.equal(state["b"], saved["weight"] * 2)
        if not adopt:
            assert torch.equal(model.weight, saved["weight"]) and torch.equal(model.bias, saved["bias"])
            assert state["a"] is tied and torch.equal(tied, saved["weight"])
    tied = torch.zeros(3, 4)
    state = {"model": model.state_dict(), "a": tied, "b": tied}  # one tensor under two keys
    storage.save({"model": model.state_dict(), "a": saved["weight"], "b": saved["weight"]}, ckpt + "2")
    storage.load(state, ckpt + "2")
    assert state["a"] is state["b"] is tied and torch.equal(tied, saved["weight"])
