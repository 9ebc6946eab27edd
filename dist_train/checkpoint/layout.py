"""The on-disk layout of checkpoints, and the filesystem steps that make a commit atomic.

    <run.dir>/checkpoints/
        step_00000120/              one complete checkpoint (complete = manifest.json exists)
            manifest.json           every other file: relative path -> {"size", "sha256"}
            meta.json               step, data position, strategy, world size, config, ... (rank 0)
            dcp/                    model (+ optimizer) as torch.distributed.checkpoint shards
            native/                 an engine's own files (DeepSpeed), when it has them
            rng/rank_00000.pt       every rank's RNG states (tensors and numbers only)
        latest                      text: the name of the newest complete checkpoint
        .staging_step_00000150/     being written; never loaded; removed at the next start

A commit is: fsync every file and directory of the staging dir, write manifest.json (tmp +
fsync + rename), fsync, rename the staging dir to ``step_XXXXXXXX``, fsync ``checkpoints/``, then
replace ``latest`` atomically. A crash before the directory rename leaves only a staging dir (the
previous checkpoint is untouched); after it, the new checkpoint is complete even if ``latest`` still
names the previous one (resume scans the directories and does not trust ``latest`` alone).

Nothing here imports torch.distributed: these are plain, single-process file operations.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from typing import Dict, Iterable, List, Optional, Tuple

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
DCP_DIR = "dcp"
NATIVE_DIR = "native"
RNG_DIR = "rng"
STAGING_PREFIX = ".staging_"
DELETING_PREFIX = ".deleting_"
FORMAT = "dist_train.checkpoint/1"

_STEP_RE = re.compile(r"^step_(\d{8})$")
_CHUNK = 4 << 20


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> Optional[int]:
    """The step of a committed checkpoint directory name, else None."""
    m = _STEP_RE.match(os.path.basename(os.path.normpath(name)))
    return int(m.group(1)) if m else None


def staging_name(step: int) -> str:
    return STAGING_PREFIX + step_name(step)


def rng_file(rank: int) -> str:
    return os.path.join(RNG_DIR, f"rank_{rank:05d}.pt")


# --- durable writes -------------------------------------------------------------------------

def fsync_file(path: str) -> None:
    """fsync a file (or a directory) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory, so the names created, renamed or removed in it survive a crash."""
    fsync_file(path)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced temporary file and an atomic rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


# --- manifest ---------------------------------------------------------------------------------

def list_files(root: str) -> List[str]:
    """Every regular file under ``root`` as a sorted relative path, the manifest excluded."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def describe_files(root: str, rel_paths: Iterable[str]) -> Dict[str, dict]:
    """``{rel: {"size", "sha256"}}`` for the given files (each rank hashes its share)."""
    return {rel: {"size": os.path.getsize(os.path.join(root, rel)), "sha256": sha256_file(os.path.join(root, rel))}
            for rel in rel_paths}


def read_manifest(ckpt: str) -> dict:
    """The parsed manifest; raises ValueError with a readable reason when missing or malformed."""
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError("no manifest.json (an incomplete or foreign directory)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"manifest.json is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"manifest.json is not a {FORMAT} manifest")
    root = os.path.realpath(ckpt)
    for rel, entry in manifest["files"].items():
        problem = _bad_entry(root, rel, entry)
        if problem:
            raise ValueError(f"manifest.json lists {rel!r}, {problem}: refusing the whole checkpoint")
    return manifest


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _bad_entry(root: str, rel: str, entry: object) -> Optional[str]:
    """Why one manifest entry cannot be trusted, else None. Every listed file is later stat-ed and
    hashed: a path that leaves the checkpoint directory (``../``, absolute, or through a symbolic
    link) would make verification read files outside it."""
    if not rel or "\0" in rel or os.path.isabs(rel) or os.path.normpath(rel) != rel or rel.split(os.sep)[0] == "..":
        return "which is not a plain relative path inside the checkpoint"
    if not (isinstance(entry, dict) and type(entry.get("size")) is int and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str) and _SHA256_RE.match(entry["sha256"])):
        return "whose entry is not {\"size\": bytes, \"sha256\": 64 hex digits}"
    if not os.path.realpath(os.path.join(root, rel)).startswith(root + os.sep):
        return "which resolves outside the checkpoint directory (a symbolic link)"
    return None


def check_sizes(ckpt: str, files: Dict[str, dict]) -> List[str]:
    """Cheap first pass: every listed file exists with its recorded size."""
    errors = []
    for rel, entry in sorted(files.items()):
        path = os.path.join(ckpt, rel)
        if not os.path.isfile(path):
            errors.append(f"{rel}: missing")
        elif os.path.getsize(path) != entry["size"]:
            errors.append(f"{rel}: size {os.path.getsize(path)} != {entry['size']} in the manifest (truncated or overwritten)")
    return errors


def check_hashes(ckpt: str, files: Dict[str, dict], rel_paths: Iterable[str]) -> List[str]:
    errors = []
    for rel in rel_paths:
        digest = sha256_file(os.path.join(ckpt, rel))
        if digest != files[rel]["sha256"]:
            errors.append(f"{rel}: sha256 {digest[:12]}... != {files[rel]['sha256'][:12]}... in the manifest (corrupt)")
    return errors


def verify(ckpt: str) -> List[str]:
    """All problems of one checkpoint directory, checked in this one process ([] = verified)."""
    try:
        files = read_manifest(ckpt)["files"]
    except ValueError as exc:
        return [str(exc)]
    return check_sizes(ckpt, files) or check_hashes(ckpt, files, sorted(files))


def write_manifest(staging: str, step: int, files: Dict[str, dict]) -> None:
    """fsync every file and directory of ``staging``, then write its manifest durably."""
    for rel in files:
        fsync_file(os.path.join(staging, rel))
    for dirpath, _dirs, _files in os.walk(staging, topdown=False):
        fsync_dir(dirpath)
    manifest = {"format": FORMAT, "step": step, "created_unix": time.time(), "files": files}
    write_json_atomic(os.path.join(staging, MANIFEST), manifest)


# --- the checkpoints directory ------------------------------------------------------------------

def committed(ckpt_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of every ``step_XXXXXXXX`` directory, newest first (not yet verified)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(parse_step(n), os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir)]
    return sorted(((s, p) for s, p in found if s is not None and os.path.isdir(p)), reverse=True)


def read_latest(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, LATEST), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def commit(staging: str, final: str) -> None:
    """Rename the complete staging dir to its final name and point ``latest`` at it.

    A directory already at ``final`` (a checkpoint of an abandoned timeline with the same step)
    is moved aside first and deleted after the new one is in place.
    """
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):
        old = os.path.join(parent, DELETING_PREFIX + os.path.basename(final) + f".{os.getpid()}")
        os.rename(final, old)
    os.rename(staging, final)
    fsync_dir(parent)
    set_latest(parent, os.path.basename(final))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def set_latest(ckpt_dir: str, name: str) -> None:
    write_atomic(os.path.join(ckpt_dir, LATEST), name + "\n")


def to_prune(steps: List[int], keep_last: int, keep: int) -> List[int]:
    """Steps to delete so that the ``keep_last`` newest remain; ``keep`` (the checkpoint just
    committed: the newest verified one) is never among them. ``keep_last=0`` keeps everything."""
    if keep_last <= 0:
        return []
    newest_first = sorted(set(steps), reverse=True)
    kept = [keep] + [s for s in newest_first if s != keep][: max(keep_last - 1, 0)]
    return sorted(s for s in newest_first if s not in kept)


def prune(ckpt_dir: str, keep_last: int, keep: int) -> List[str]:
    """Delete old checkpoints (rename to a hidden name first, so a crash mid-delete never leaves
    a half-deleted directory that looks like a checkpoint). Returns the deleted names."""
    by_step = {s: p for s, p in committed(ckpt_dir)}
    deleted = []
    for step in to_prune(list(by_step), keep_last, keep):
        doomed = os.path.join(ckpt_dir, DELETING_PREFIX + step_name(step))
        os.rename(by_step[step], doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(step_name(step))
    if deleted:
        fsync_dir(ckpt_dir)
    return deleted


def remove_stale(ckpt_dir: str) -> List[str]:
    """Remove staging and half-deleted directories and temporary files left by a crash."""
    if not os.path.isdir(ckpt_dir):
        return []
    removed = []
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if name.startswith((STAGING_PREFIX, DELETING_PREFIX)):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
        elif name.startswith(LATEST + ".tmp"):
            os.remove(path)
    return removed


def set_aside(path: str, suffix: str) -> str:
    """Rename a checkpoint dir out of the ``step_XXXXXXXX`` namespace (kept for inspection,
    never loaded, never pruned); returns the new name."""
    target = f"{path}.{suffix}"
    if os.path.exists(target):
        target = f"{path}.{suffix}.{int(time.time())}"
    os.rename(path, target)
    return os.path.basename(target)


def trim_jsonl(path: str, max_step: int) -> int:
    """Drop the records with ``"step" > max_step`` from a JSON-lines log, in place.

    Logs are appended in step order and every resume trims them, so the records to drop are a
    suffix: the file is truncated at the first one (one syscall; a writer holding the file open
    in append mode keeps appending at the new end). Returns the number of lines dropped.
    """
    if not os.path.isfile(path):
        return 0
    offset, cut, dropped = 0, None, 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                drop = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > max_step
            except ValueError:
                drop = True  # a torn last line of a killed process
            if cut is None and drop:
                cut = offset
            if cut is not None:
                dropped += 1
            offset += len(line)
    if cut is not None:
        os.truncate(path, cut)
    return dropped
