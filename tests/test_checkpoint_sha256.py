"""The manifest's SHA-256 checksums (the run directory's contract): rank 0 adds them in the
background after each commit; the end of a run waits for them; a file that changed after the
commit gets none; a directory moved meanwhile is never written into; ``inspect --sha256`` checks
them as an outside tool would."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import spawn
from dist_train.checkpoint import digest, layout, retention

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _manager(run_dir, strategy_name="single", overrides=()):
    from test_load_hashing import _setup

    return _setup(run_dir, strategy_name, ["checkpoint.keep_last=2", *overrides])[1]


def _committed_without_sha256(tmp_path):
    """A checkpoint of step 1, committed with checkpoint.sha256=false (no digest in the background)."""
    from dist_train.train.state import TrainState

    run_dir = str(tmp_path / "run")
    manager = _manager(run_dir, overrides=["checkpoint.sha256=false"])
    try:
        manager.save(TrainState(step=1))
    finally:
        manager.close()
    return _ckpt(run_dir, 1)


def _sha256_of_every_file(ckpt):
    manifest = json.loads(open(os.path.join(ckpt, layout.MANIFEST)).read())
    return {rel: (e.get("sha256"), hashlib.sha256(open(os.path.join(ckpt, rel), "rb").read()).hexdigest())
            for rel, e in manifest["files"].items()}


def _ckpt(run_dir, step):
    return os.path.join(run_dir, "checkpoints", layout.step_name(step))


def _save_and_finish(rank, world, run_dir):
    from dist_train.train.state import TrainState

    manager = _manager(run_dir, "fsdp" if world > 1 else "single")
    try:
        manager.save(TrainState(step=1))
        manager.finalize(TrainState(step=2))
        digest.wait()  # (what the end of a job does, after summary.json)
        if rank == 0:  # every file of both checkpoints has its SHA-256, and the right one
            for step in (1, 2):
                found = _sha256_of_every_file(_ckpt(run_dir, step))
                assert found and all(recorded == actual for recorded, actual in found.values()), (step, found)
            assert not [n for n in os.listdir(_ckpt(run_dir, 2)) if n.startswith((digest.TMP_PREFIX, digest.SIDE_PREFIX))]
    finally:
        manager.close()


def test_every_file_of_a_finished_run_has_its_sha256(tmp_path):
    # A real run: the process waits for the digests before it exits.
    from conftest import run_cli

    run = tmp_path / "run"
    assert run_cli(["model.name=mlp", "data.name=digits", "model.hidden=16", "train.max_steps=4",
                    "checkpoint.every_steps=2", "logging.mlflow.enabled=false", f"run.dir={run}"]).returncode == 0
    for step in (2, 4):
        found = _sha256_of_every_file(_ckpt(str(run), step))
        assert found and all(recorded == actual for recorded, actual in found.values()), (step, found)
    out = subprocess.run([sys.executable, "-m", "dist_train.checkpoint", "inspect", str(tmp_path / "run"), "--sha256"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "verification   OK" in out.stdout, out.stdout + out.stderr
    # (it says the SHA-256 check ran: the output was the same as without --sha256)
    assert "recorded for 4 of 4 files; 4 checked (--sha256), every one matches" in out.stdout, out.stdout


def test_two_ranks_each_shard_gets_its_sha256(tmp_path):
    # FSDP: each rank writes its own shard file and hashes it; rank 0 merges the other's digests.
    spawn(_save_and_finish, 2, str(tmp_path / "run"))
    assert any(rel.startswith("dcp/__1_") for rel in _sha256_of_every_file(_ckpt(str(tmp_path / "run"), 2)))


def test_inspect_sha256_catches_a_wrong_recorded_digest_that_xxh3_cannot(tmp_path):
    _save_and_finish(0, 1, str(tmp_path / "run"))
    ckpt = _ckpt(str(tmp_path / "run"), 2)
    path = os.path.join(ckpt, layout.MANIFEST)
    manifest = json.loads(open(path).read())
    manifest["files"]["meta.json"]["sha256"] = "0" * 64
    open(path, "w").write(json.dumps(manifest))
    inspect = [sys.executable, "-m", "dist_train.checkpoint", "inspect", ckpt]
    plain = subprocess.run(inspect, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stdout + plain.stderr  # XXH3-128 still matches
    deep = subprocess.run(inspect + ["--sha256"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert deep.returncode == 1 and "meta.json: sha256 " in deep.stdout, deep.stdout + deep.stderr


def test_a_file_changed_after_the_commit_gets_no_sha256_and_the_others_do(tmp_path):
    ckpt = _committed_without_sha256(tmp_path)
    assert all(recorded is None for recorded, _ in _sha256_of_every_file(ckpt).values())
    with open(os.path.join(ckpt, layout.META), "r+b") as f:
        f.write(b"X")
    problems = digest.add_sha256(ckpt)
    assert len(problems) == 1 and problems[0].startswith("meta.json: xxh3_128 "), problems
    found = _sha256_of_every_file(ckpt)
    assert found.pop("meta.json")[0] is None
    assert found and all(recorded == actual for recorded, actual in found.values()), found


def test_a_directory_moved_while_its_files_are_hashed_is_not_written_into(tmp_path, monkeypatch):
    from dist_train.train.state import TrainState

    run_dir = str(tmp_path / "run")
    manager = _manager(run_dir, overrides=["checkpoint.sha256=false", "checkpoint.keep_last=1"])
    try:
        manager.save(TrainState(step=1))
        ckpt = _ckpt(run_dir, 1)
        before = open(os.path.join(ckpt, layout.MANIFEST), "rb").read()
        real = digest._hash_both

        def prune_meanwhile(path):  # the next commit prunes step 1 while the digest reads it
            got = real(path)
            if os.path.isdir(ckpt):
                manager.save(TrainState(step=2))
            return got

        monkeypatch.setattr(digest, "_hash_both", prune_meanwhile)
        assert digest.add_sha256(ckpt) == []
        retention.wait_deleted()
    finally:
        manager.close()
    ckpts = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000002"], os.listdir(ckpts)  # no step_00000001 made again
    assert before  # (step 1's manifest was read before it went)


def test_a_manifest_replaced_meanwhile_is_left_as_it_is(tmp_path, monkeypatch):
    ckpt = _committed_without_sha256(tmp_path)
    path = os.path.join(ckpt, layout.MANIFEST)
    real = digest._hash_both
    other = json.loads(open(path).read())
    other["note"] = "rewritten by someone else"

    def rewrite_meanwhile(file):
        got = real(file)
        if "note" not in open(path).read():
            layout.write_atomic(path, json.dumps(other))
        return got

    monkeypatch.setattr(digest, "_hash_both", rewrite_meanwhile)
    assert digest.add_sha256(ckpt) == []
    assert json.loads(open(path).read()) == other
    assert not [n for n in os.listdir(ckpt) if n.startswith(digest.TMP_PREFIX)]


def test_a_killed_digest_leaves_a_temporary_manifest_the_next_one_removes(tmp_path):
    ckpt = _committed_without_sha256(tmp_path)
    stale = os.path.join(ckpt, digest.TMP_PREFIX + "999999")
    open(stale, "w").write("{")
    assert layout.verify(ckpt) == []  # (a file the manifest does not list is no part of the checkpoint)
    assert digest.add_sha256(ckpt) == [] and not os.path.exists(stale)
    assert all(recorded == actual for recorded, actual in _sha256_of_every_file(ckpt).values())


@pytest.mark.parametrize("enabled", [True, False])
def test_checkpoint_sha256_key_turns_it_off(tmp_path, enabled):
    from dist_train.train.state import TrainState

    run_dir = str(tmp_path / "run")
    manager = _manager(run_dir, overrides=[f"checkpoint.sha256={str(enabled).lower()}"])
    try:
        manager.finalize(TrainState(step=1))
        digest.wait()
    finally:
        manager.close()
    found = _sha256_of_every_file(_ckpt(run_dir, 1))
    assert all((recorded == actual) if enabled else recorded is None for recorded, actual in found.values()), found


def test_each_rank_hashes_its_own_files_and_rank_0_merges_what_comes(tmp_path):
    ckpt = _committed_without_sha256(tmp_path)
    files = sorted(json.loads(open(os.path.join(ckpt, layout.MANIFEST)).read())["files"])
    ours, theirs = [f for f in files if not f.startswith("dcp/__")], [f for f in files if f.startswith("dcp/__")]
    # Rank 1 never answers (gone): rank 0 records its own files' after waiting, the others' stay without.
    assert digest.add_sha256(ckpt, ours, rank=0, world=2, wait_s=0.2) == []
    found = _sha256_of_every_file(ckpt)
    assert all(found[rel][0] == found[rel][1] for rel in ours) and all(found[rel][0] is None for rel in theirs)
    # Rank 1 leaves its digests; rank 0's next pass merges them (and removes the side file).
    assert digest.add_sha256(ckpt, theirs, rank=1, world=2) == []
    assert any(n.startswith(digest.SIDE_PREFIX) for n in os.listdir(ckpt))
    assert digest.add_sha256(ckpt, [], rank=0, world=2, wait_s=5) == []
    assert all(recorded == actual for recorded, actual in _sha256_of_every_file(ckpt).values())
    assert not any(n.startswith(digest.SIDE_PREFIX) for n in os.listdir(ckpt))


def test_a_resumed_checkpoint_without_them_gets_its_sha256(tmp_path):
    """The attempt that wrote it ended before its digests were in (killed; a rank gone): the run
    that resumes from it adds them."""
    from dist_train.train.state import TrainState

    ckpt = _committed_without_sha256(tmp_path)
    manager = _manager(str(tmp_path / "run"))
    try:
        assert manager.resume(TrainState()) == ckpt
        digest.wait()
    finally:
        manager.close()
    assert all(recorded == actual for recorded, actual in _sha256_of_every_file(ckpt).values())


def test_rank_0_takes_a_peers_digest_only_for_the_bytes_listed_and_never_waits_in_vain(tmp_path):
    ckpt = _committed_without_sha256(tmp_path)
    files = json.loads(open(os.path.join(ckpt, layout.MANIFEST)).read())["files"]
    shard = next(rel for rel in files if rel.endswith(".distcp"))
    # A side file of another checkpoint of the same step (its XXH3 differs): not taken.
    with open(os.path.join(ckpt, f"{digest.SIDE_PREFIX}00001.json"), "w") as f:
        json.dump({shard: ["0" * 32, "a" * 64]}, f)
    assert digest.add_sha256(ckpt, [], rank=0, world=2, wait_s=5) == []
    assert _sha256_of_every_file(ckpt)[shard][0] is None
    assert not any(n.startswith(digest.SIDE_PREFIX) for n in os.listdir(ckpt))
    # A peer that cannot read its files still answers (with nothing), so rank 0 does not wait 300 s.
    gone = os.path.join(str(tmp_path), "gone")
    os.makedirs(gone)
    assert digest.add_sha256(gone, None, rank=1, world=2) == []
    assert os.listdir(gone) == [f"{digest.SIDE_PREFIX}00001.json"]
