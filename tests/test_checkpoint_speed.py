"""Checkpoint checksums after the speed work: digests taken while writing equal those of the files
read back, a flipped byte is caught in every kind of file (format-2 xxh3_128 manifests and old
format-1 sha256 ones), the DCP round trip is exact, and the benchmark's smoke mode runs."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from dist_train.checkpoint import checksum, decode, layout, storage

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return model, opt, {"model": msd, "optim": osd}


def _checkpoint(tmp_path, step=3):
    """A checkpoint as the manager writes one: DCP shards, meta.json, an RNG file, manifest."""
    staging = tmp_path / "checkpoints" / layout.staging_name(step)
    os.makedirs(staging / layout.RNG_DIR)
    with open(staging / layout.rng_file(0), "wb") as f:
        torch.save({"torch": torch.get_rng_state()}, f)
    layout.write_json_atomic(str(staging / layout.META), {"step": step})
    model, opt, sd = _state()
    storage.save(sd, str(staging / layout.DCP_DIR))
    files = layout.describe_files(str(staging), layout.list_files(str(staging)))
    layout.write_manifest(str(staging), step, files)
    final = tmp_path / "checkpoints" / layout.step_name(step)
    layout.commit(str(staging), str(final))
    return final, model, opt


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


def test_digests_taken_while_writing_equal_the_files_read_back(tmp_path):
    staging = tmp_path / "s"
    os.makedirs(staging)
    layout.write_json_atomic(str(staging / "meta.json"), {"a": 1})
    _model, _opt, sd = _state()
    storage.save(sd, str(staging / "dcp"))
    rels = layout.list_files(str(staging))
    assert {"meta.json", "dcp/.metadata"} <= set(rels) and any(r.endswith(".distcp") for r in rels)
    during = {rel: checksum.recorded(str(staging / rel)) for rel in rels}
    assert all(during.values()), during  # every file was hashed on the way out, none read back
    for rel, entry in during.items():
        # write_json_atomic fsyncs its file; DCP's files are fsynced later, by the commit, together.
        assert entry.pop(checksum.SYNCED, False) is (rel == "meta.json"), rel
        assert entry == checksum.hash_file(str(staging / rel)), rel
    # Consumed once; a file changed after its digest was taken is never described by that digest.
    assert checksum.recorded(str(staging / "meta.json")) is None
    layout.write_json_atomic(str(staging / "meta.json"), {"a": 1})
    with open(staging / "meta.json", "ab") as f:
        f.write(b" ")
    described = layout.describe_files(str(staging), ["meta.json"])["meta.json"]
    assert described == checksum.hash_file(str(staging / "meta.json")) and checksum.SYNCED not in described


def test_hashing_file_gives_up_on_non_sequential_writes(tmp_path):
    with open(tmp_path / "x", "wb") as raw:
        f = checksum.HashingFile(raw)
        f.write(b"abc")
        f.write(memoryview(b"defg"))
        f.flush()
        assert f.entry() == checksum.hash_file(str(tmp_path / "x")) and f.entry()["size"] == 7
        f.seek(0)
        f.write(b"z")
        assert f.entry() is None


def test_hashing_file_gathers_small_writes_and_keeps_offsets(tmp_path, monkeypatch):
    """Small writes are buffered, big ones go through; tell() counts buffered bytes (DCP records
    each item's offset with it); close() empties the buffer; writeback is started as bytes go out."""
    monkeypatch.setattr(checksum, "_GATHER", 64)
    monkeypatch.setattr(checksum, "_WRITEBACK", 100)
    calls = []
    if checksum._sync_file_range is not None:
        real = checksum._sync_file_range
        monkeypatch.setattr(checksum, "_sync_file_range", lambda *a: calls.append(a[1:3]) or real(*a))
    pieces = [bytes([i]) * n for i, n in enumerate([3, 10, 70, 1, 200, 5, 64, 2])]
    with open(tmp_path / "x", "wb") as raw:
        f = checksum.HashingFile(raw)
        offsets = []
        for piece in pieces:
            offsets.append(f.tell())
            f.write(piece)
        f.close()
    data = (tmp_path / "x").read_bytes()
    assert data == b"".join(pieces)
    assert offsets == [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    assert f.entry() == checksum.hash_file(str(tmp_path / "x"))
    if checksum._sync_file_range is not None:  # (Linux) contiguous ranges from offset 0, none twice
        assert calls and calls[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(calls, calls[1:])), calls


def test_make_durable_fsyncs_each_file_once_and_every_directory(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    os.makedirs(staging / "dcp")
    os.makedirs(staging / "rng")
    for rel in ("dcp/a.distcp", "rng/rank_00000.pt", "meta.json", layout.MANIFEST):
        (staging / rel).write_bytes(b"x")
    synced = []
    monkeypatch.setattr(layout, "fsync_file", lambda p: synced.append(os.path.relpath(p, staging)))
    layout.make_durable(str(staging), ["dcp/a.distcp", "meta.json"], tree=False)
    assert sorted(synced) == ["dcp/a.distcp", "meta.json"]
    synced.clear()
    layout.make_durable(str(staging), ["rng/rank_00000.pt"], tree=True)
    assert sorted(synced) == sorted([".", "dcp", "rng", layout.MANIFEST, "rng/rank_00000.pt"])


def test_stager_reuses_its_buffers_and_copies_values(tmp_path):
    from dist_train.checkpoint.files import Stager

    stager = Stager()
    w = torch.arange(6.0).reshape(2, 3)
    state = {"model": {"w": w, "n": 3}, "optim": {"state": {0: {"step": torch.tensor(1.0)}}, "groups": [{"lr": 0.1}]}}
    first = stager.stage(state)
    assert torch.equal(first["model"]["w"], w) and first["model"]["w"].data_ptr() != w.data_ptr()
    assert first["model"]["n"] == 3 and first["optim"]["groups"] == [{"lr": 0.1}]
    assert first["optim"]["groups"][0] is not state["optim"]["groups"][0]  # mutable leaves copied
    w.add_(1)  # training goes on: the staged copy keeps the values of the save
    assert torch.equal(first["model"]["w"], torch.arange(6.0).reshape(2, 3))
    second = stager.stage(state)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # same buffer, no allocation
    assert torch.equal(second["model"]["w"], w)
    state["model"]["w"] = torch.zeros(3, 3)  # another shape at the same place: a new buffer
    assert stager.stage(state)["model"]["w"].shape == (3, 3)
    stager.close()


@pytest.fixture(params=[1, 3], ids=["one-file", "three-files"])
def dcp_files(request, monkeypatch):
    """How many files a rank's share is written to: 1, or 3 (as a large share is on 3+ cores)."""
    if request.param > 1:
        monkeypatch.setattr(storage, "_FILE_BYTES", 1)
        monkeypatch.setattr(storage, "_MAX_FILES", request.param)
        monkeypatch.setattr(storage, "_cpus", lambda: 8)
    return request.param


def test_a_large_share_is_written_to_one_file_per_core_up_to_a_limit(monkeypatch):
    big = {"a": torch.empty(storage._FILE_BYTES // 4 * 5, dtype=torch.float32), "b": [torch.empty(0), 3]}
    for cores, local_world, want in [(1, 1, 1), (2, 1, 2), (16, 1, 5), (16, 8, 2), (64, 1, 5)]:
        monkeypatch.setattr(storage, "_cpus", lambda: cores)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
        assert storage.files_per_rank(big) == want, (cores, local_world)
    assert storage.files_per_rank({"small": torch.zeros(1000)}) == 1


def test_manifest_format_2_records_xxh3_and_the_dcp_round_trip_is_exact(tmp_path, dcp_files):
    ckpt, model, opt = _checkpoint(tmp_path)
    shards = [r for r in layout.list_files(str(ckpt)) if r.endswith(".distcp")]
    assert len(shards) == dcp_files, shards
    manifest = json.loads((ckpt / layout.MANIFEST).read_text())
    assert manifest["format"] == layout.FORMAT == "dist_train.checkpoint/2"
    assert all(set(e) == {"size", "xxh3_128"} for e in manifest["files"].values()), manifest["files"]
    assert layout.verify(str(ckpt)) == []
    # Loading (tensors handed over whole where possible) gives back exactly the saved state.
    fresh_model, fresh_opt, sd = _state()
    for p in fresh_model.parameters():
        p.data.zero_()
    for s in fresh_opt.state.values():
        for v in s.values():
            if torch.is_tensor(v):
                v.zero_()
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = {"model": sd["model"], "optim": sd["optim"]}
    storage.load(sd, str(ckpt / layout.DCP_DIR))
    set_state_dict(fresh_model, fresh_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    for (ka, a), (kb, b) in zip(sorted(opt.state_dict()["state"].items()), sorted(fresh_opt.state_dict()["state"].items())):
        assert ka == kb and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


@pytest.mark.parametrize("old_format", [False, True], ids=["xxh3_128", "sha256-format-1"])
def test_a_flipped_byte_is_caught_in_every_file(tmp_path, old_format, dcp_files):
    ckpt, _m, _o = _checkpoint(tmp_path)
    if old_format:  # rewrite the manifest as format 1 wrote it: sha256 entries
        manifest = json.loads((ckpt / layout.MANIFEST).read_text())
        manifest["format"] = "dist_train.checkpoint/1"
        manifest["files"] = {rel: {"size": e["size"], "sha256": hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()}
                             for rel, e in manifest["files"].items()}
        (ckpt / layout.MANIFEST).write_text(json.dumps(manifest))
    rels = layout.list_files(str(ckpt))
    kinds = {"meta.json", "dcp/.metadata", layout.rng_file(0)} | {r for r in rels if r.endswith(".distcp")}
    assert kinds == set(rels) and layout.verify(str(ckpt)) == []
    algorithm = "sha256" if old_format else "xxh3_128"
    for rel in rels:
        size = (ckpt / rel).stat().st_size
        for offset in (0, size // 2, size - 1):  # first, middle and last byte
            original = (ckpt / rel).read_bytes()
            _flip(ckpt / rel, offset)
            errors = layout.verify(str(ckpt))
            assert len(errors) == 1 and errors[0].startswith(f"{rel}: {algorithm} ") and "corrupt" in errors[0], errors
            (ckpt / rel).write_bytes(original)
    assert layout.verify(str(ckpt)) == []


def test_an_entry_without_a_checksum_does_not_verify(tmp_path):
    ckpt, _m, _o = _checkpoint(tmp_path)
    manifest = json.loads((ckpt / layout.MANIFEST).read_text())
    del manifest["files"]["meta.json"]["xxh3_128"]
    (ckpt / layout.MANIFEST).write_text(json.dumps(manifest))
    errors = layout.verify(str(ckpt))  # refused when the manifest is read: the entry has no checksum
    assert len(errors) == 1 and "'meta.json'" in errors[0] and "xxh3_128" in errors[0], errors


def test_zip_crc_setting_is_restored_after_a_dcp_write(tmp_path):
    from torch.utils.serialization import config

    assert config.save.compute_crc32 is True
    _model, _opt, sd = _state()
    storage.save(sd, str(tmp_path / "dcp"))
    assert config.save.compute_crc32 is True


def test_overlapping_writers_leave_the_crc_setting_as_they_found_it(monkeypatch):
    """Older torch (2.11) has one serialization setting for the whole process: writer threads
    that overlap (A in, B in, A out, B out) must not leave CRC32s off for the user's own saves.
    Here a shared stand-in plays torch's setting (torch 2.14's is per thread)."""
    import threading
    import types

    from dist_train.checkpoint import encode

    shared = types.SimpleNamespace(save=types.SimpleNamespace(compute_crc32=True))
    monkeypatch.setattr(encode, "config", shared)
    monkeypatch.setattr(encode, "_PER_THREAD", False)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    inside = []

    def writer_a():
        with encode.no_zip_crc():
            a_in.set()
            b_in.wait(5)
            inside.append(shared.save.compute_crc32)
        a_out.set()

    def writer_b():
        a_in.wait(5)
        with encode.no_zip_crc():
            b_in.set()
            a_out.wait(5)
            inside.append(shared.save.compute_crc32)

    threads = [threading.Thread(target=writer_a), threading.Thread(target=writer_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert inside == [False, False]
    assert shared.save.compute_crc32 is True  # (each thread restoring what it saw on entry: False)


@pytest.mark.slow
def test_benchmark_smoke_mode_runs():
    out = subprocess.run([sys.executable, "benchmarks/checkpoint_bench.py", "--smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.lstrip().startswith("save ") and "MB/s" in line and "ratio" in line for line in lines), out.stdout
    assert any(line.lstrip().startswith("load ") and "MB/s" in line and "ratio" in line for line in lines), out.stdout
    assert any(line.lstrip().startswith("async ") for line in lines), out.stdout
    assert any(line.lstrip().startswith("new process:") and "ratio" in line for line in lines), out.stdout


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_item_decoder_matches_torch_load_without_it_and_runs_no_code(tmp_path, monkeypatch):
    """DCP items (one torch.save archive per tensor or non-tensor leaf) are decoded by a C unpickler
    that builds plain tensors and primitive values only: the same objects torch.load gives, without
    torch.load for them; anything else falls back to torch.load(weights_only=True), which refuses
    code (a crafted item cannot run any)."""
    import io
    import pickle

    items = [torch.randn(7), torch.randn(3, 4).t(), torch.tensor(5.0), torch.arange(10), torch.zeros(0),
             torch.randn(4, dtype=torch.bfloat16), torch.randn(6)[2:5], torch.ones(3, dtype=torch.bool),
             0.001, (0.9, 0.999), True, None, "adamw", [1, 2], {"a": 1}]
    archives = []
    for obj in items:
        buf = io.BytesIO()
        torch.save(obj, buf)
        archives.append(buf.getvalue())
    expected = [torch.load(io.BytesIO(a), weights_only=True) for a in archives]
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used for a plain item"))
    for obj, archive, want in zip(items, archives, expected):
        got = decode.load_item(archive)
        if isinstance(want, torch.Tensor):
            assert type(got) is torch.Tensor and torch.equal(got, want) and got.dtype == want.dtype
            assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset()
        else:
            assert got == want and type(got) is type(want), obj
    monkeypatch.undo()
    buf = io.BytesIO()
    torch.save(_Evil(str(tmp_path / "pwned")), buf)
    with pytest.raises(pickle.UnpicklingError):
        decode.load_item(buf.getvalue())
    assert not (tmp_path / "pwned").exists()
    buf = io.BytesIO()
    torch.save(torch.nn.Parameter(torch.ones(2)), buf)  # not plain: torch.load's answer
    assert torch.equal(decode.load_item(buf.getvalue()), torch.ones(2))


class _CallsStorage:
    def __reduce__(self):
        return (torch.FloatStorage, (10,))


class _GradByBuild:
    def __reduce__(self):
        import collections
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.ones(2).storage()
        return (torch._utils._rebuild_tensor_v2, (storage, 0, (2,), (1,), False, collections.OrderedDict()),
                (True, None, collections.OrderedDict()))


@pytest.mark.parametrize("crafted", [_CallsStorage(), _GradByBuild(), [torch.ones(2).requires_grad_()]],
                         ids=["storage-call", "grad-by-build", "nested-grad"])
def test_item_decoder_hands_anything_unusual_to_torch_load(crafted):
    """Storage classes are not callable and tensors given grad or hooks (by the rebuild arguments or a
    later BUILD) are not accepted on the fast path: torch.load(weights_only=True) decides, exactly."""
    import io

    buf = io.BytesIO()
    torch.save(crafted, buf)
    try:
        want = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as exc:  # noqa: BLE001
        with pytest.raises(type(exc)):
            decode.load_item(buf.getvalue())
        return
    got = decode.load_item(buf.getvalue())
    flat = lambda x: x if isinstance(x, list) else [x]  # noqa: E731
    for a, b in zip(flat(got), flat(want)):
        assert type(a) is type(b) and a.requires_grad == b.requires_grad and torch.equal(a.detach(), b.detach())


def test_the_fast_checkpointable_tensor_test_answers_as_dcp_own(tmp_path):
    """protocol_check replaces DCP's per-value ``isinstance(obj, CheckpointableTensor)`` (slow on
    Python 3.11) where it is installed; its answers are DCP's for every kind of value."""
    import sys

    from torch.distributed.checkpoint import default_planner, planner_helpers

    from dist_train.checkpoint import protocol_check

    protocol = pytest.importorskip("torch.distributed.checkpoint.protocol", reason="a torch without DCP's "
                                   "CheckpointableTensor protocol (older than the pinned 2.14): nothing to replace")
    installed = protocol_check.install()
    assert installed == (sys.version_info < (3, 12))
    if not installed:
        return
    for module in (protocol, default_planner, planner_helpers):
        assert module._is_checkpointable_tensor is protocol_check.is_checkpointable_tensor
    original = protocol_check._original

    class Sub(torch.Tensor):
        pass

    marked = torch.zeros(4)
    for name, value in (("global_shape", (8,)), ("global_offsets", ((4,),)), ("local_offsets", ((0,),)),
                        ("local_sizes", ((4,),))):
        setattr(marked, name, value)
    half = torch.zeros(4)
    half.global_shape = (8,)  # (one attribute of four: not one)
    values = [torch.zeros(3), torch.nn.Parameter(torch.zeros(3)), torch.zeros(3).as_subclass(Sub), marked, half,
              3, "x", None, [torch.zeros(1)], {"a": 1}]
    for value in values:
        assert protocol_check.is_checkpointable_tensor(value) == original(value), value
    assert protocol_check.is_checkpointable_tensor(marked) and not protocol_check.is_checkpointable_tensor(half)


def test_a_virtual_subclass_of_the_protocol_sends_every_value_to_dcp_own_test():
    import abc
    import sys

    from dist_train.checkpoint import protocol_check

    protocol = pytest.importorskip("torch.distributed.checkpoint.protocol", reason="a torch without DCP's "
                                   "CheckpointableTensor protocol (older than the pinned 2.14): nothing to replace")

    if not protocol_check.install():
        assert sys.version_info >= (3, 12)
        return

    class Marker(torch.Tensor):
        pass

    assert not protocol_check.is_checkpointable_tensor(torch.zeros(2))
    protocol.CheckpointableTensor.register(Marker)  # (a registration: every plain value is asked again)
    try:
        value = torch.zeros(2)
        assert protocol_check.is_checkpointable_tensor(value) == protocol_check._original(value)
        assert abc._get_dump(protocol.CheckpointableTensor)[0]
        asked = []
        real = protocol_check._original
        protocol_check._original = lambda obj: asked.append(obj) or real(obj)
        try:
            protocol_check.is_checkpointable_tensor(value)
        finally:
            protocol_check._original = real
        assert asked == [value]
    finally:
        abc._reset_registry(protocol.CheckpointableTensor)
        abc._reset_caches(protocol.CheckpointableTensor)
    assert not protocol_check.is_checkpointable_tensor(torch.zeros(2))


def _plans(state_dict, metadata):
    """(SafeLoadPlanner's local plan, DefaultLoadPlanner's) of ``state_dict`` against ``metadata``;
    an exception either raises is returned in its place."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    out = []
    ours = storage.SafeLoadPlanner(flatten_sharded_tensors=storage._holds_sharded_tensor(state_dict))
    for planner in (ours, DefaultLoadPlanner()):
        planner.set_up_planner(state_dict, metadata, True)
        try:
            out.append(planner.create_local_plan().items)
        except Exception as exc:  # noqa: BLE001  (compared below)
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def _indices(items):
    return [(i.dest_index.index, i.storage_index.index) for i in items] if isinstance(items, list) else items


def test_the_direct_local_load_plan_is_dcp_own(tmp_path, monkeypatch):
    """``SafeLoadPlanner.create_local_plan`` builds the read items of whole plain tensors and of
    non-tensor leaves itself: the plan equals DefaultLoadPlanner's item for item (indices too) for
    a state dict with 0-d, empty, bf16, int64 and Parameter entries and optimizer leaves; for a
    checkpoint chunked in two; and it fails as DCP does on a size mismatch or a key the
    checkpoint lacks. A checkpoint with keys the state dict lacks is planned by DCP whole."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    model, _opt, sd = _state()
    sd["extra"] = {"empty": torch.zeros(0, 3), "bf16": torch.randn(3, 2).bfloat16(), "count": torch.tensor(7),
                   "param": torch.nn.Parameter(torch.randn(2)), "note": "x"}
    storage.save(sd, str(tmp_path / "dcp"))
    metadata = decode.read_metadata(str(tmp_path / "dcp"))
    general = []
    real = storage.create_default_local_load_plan
    monkeypatch.setattr(storage, "create_default_local_load_plan", lambda sd, *a: general.extend(sd) or real(sd, *a))

    ours, dcp_own = _plans(sd, metadata)
    assert isinstance(ours, list) and ours == dcp_own and _indices(ours) == _indices(dcp_own)
    assert sorted(general) == ["extra.empty", "extra.param"]  # (everything else built directly)

    wrong = {**sd, "extra": {**sd["extra"], "bf16": torch.randn(2, 3).bfloat16()}}
    ours, dcp_own = _plans(wrong, metadata)
    assert isinstance(ours, str) and ours == dcp_own and "Size mismatch" in ours
    extra_key = {**sd, "new": torch.zeros(2)}
    ours, dcp_own = _plans(extra_key, metadata)
    assert isinstance(ours, str) and ours == dcp_own and "Missing key" in ours

    general.clear()
    ours, dcp_own = _plans({"model": sd["model"]}, metadata)  # (load_optimizer=false: fewer keys)
    assert ours == dcp_own and _indices(ours) == _indices(dcp_own) and len(ours) == len(sd["model"])

    # A weight stored in two row chunks (as two FSDP ranks save it), loaded whole by one process.
    key = "model.0.weight"
    whole = metadata.state_dict_metadata[key]
    rows = whole.size[0] // 2
    chunks = [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([rows, whole.size[1]])),
              ChunkStorageMetadata(offsets=torch.Size([rows, 0]), sizes=torch.Size([whole.size[0] - rows, whole.size[1]]))]
    metadata.state_dict_metadata[key] = TensorStorageMetadata(whole.properties, whole.size, chunks)
    ours, dcp_own = _plans(sd, metadata)
    assert ours == dcp_own and _indices(ours) == _indices(dcp_own)
    assert [i.storage_index.index for i in ours if i.dest_index.fqn == key] == [0, 1]


def test_the_sharded_tensor_pass_is_skipped_only_without_sharded_tensors(monkeypatch):
    """``storage.load`` skips DCP's ShardedTensor rewriting pass (a copy of the state dict) when
    none is nested anywhere in it; the test plans above show the plan is DCP's either way."""
    class Sharded(torch.Tensor):
        pass

    monkeypatch.setattr(storage, "ShardedTensor", Sharded)
    deep = torch.randn(2).as_subclass(Sharded)
    plain = {"model": {"w": torch.randn(2)}, "optim": {"state": {0: {"step": torch.tensor(1.0)}},
                                                       "param_groups": [{"lr": 0.1, "params": [0]}]}}
    assert not storage._holds_sharded_tensor(plain)
    assert storage._holds_sharded_tensor({**plain, "model": {"w": deep}})
    assert storage._holds_sharded_tensor({"optim": {"state": {0: {"exp_avg": deep}}}})
    assert storage._holds_sharded_tensor({"a": [({"b": deep},)]})
    assert storage._holds_sharded_tensor({"a": types.MappingProxyType({"b": deep})})  # (any mapping, as DCP's)
