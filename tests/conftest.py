"""Shared test helpers: run the real CLI (python -m / torchrun) and spawn real gloo groups."""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch.multiprocessing as mp
from hypothesis import HealthCheck, settings

from dist_train.env.ports import free_port  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parents[1]


def fuzz_settings(n: int) -> settings:
    """Hypothesis settings of every property test: ``n`` examples, derandomized (the same on every
    machine), no example database, no deadline."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def clean_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The test process's environment without any launcher variables (we may run under SLURM)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_cli(args: Sequence[str], nproc: int = 0, timeout: float = 600, env: Optional[Dict[str, str]] = None,
            cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """``python -m dist_train ARGS`` (nproc=0) or ``torchrun --nproc_per_node=N -m dist_train ARGS``."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dist_train", *args]
    else:
        cmd = [sys.executable, "-m", "dist_train", *args]
    # Past the timeout every process of the job goes, after their stacks are taken for the report
    # (killing torchrun alone left its workers, in sessions of their own, running on).
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pids = [proc.pid, *_descendants(proc.pid)]
        stacks = stacks_of(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[2:5])} ... still running after {timeout:.0f} s (a hang); every process's "
                    f"stacks:\n{stacks}\nSTDERR:\n{err[-6000:]}", pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _descendants(root: int) -> List[int]:
    """The live descendants of process ``root`` (a launcher's workers and their DataLoader workers)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":  # (state, ppid, ...)
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def read_metrics(run_dir: Path) -> List[dict]:
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(run_dir: Path) -> Dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def read_summary(run_dir: Path) -> dict:
    with open(Path(run_dir) / "summary.json", encoding="utf-8") as f:
        return json.load(f)


# A spawned test that hangs must explain itself long before CI's limit: one collective may wait
# this long before gloo raises on the waiting rank, and a whole spawned test may run this long
# before its ranks' stacks are dumped and they are killed.
COLLECTIVE_TIMEOUT_S = 300
SPAWN_TIMEOUT_S = 600


def _spawn_entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        gc.collect()  # groups held in reference cycles (a checkpoint manager's) go while all is alive
        dist.destroy_process_group()
    # Ended as the CLIs end (dist_train.env.shutdown): without the interpreter's teardown, in which
    # a gloo object still alive now and then aborted a rank ("terminate called without an active
    # exception", SIGABRT) after a passing test. A failure above leaves the ordinary way.
    from dist_train.env.shutdown import exit_process

    exit_process(0)


def stacks_of(pids: Sequence[int]) -> str:
    """Every thread's stack of each process (py-spy, when installed), for a hang report."""
    from dist_train.train.phases import py_spy_dump

    dumps = [(pid, py_spy_dump(pid)) for pid in pids]
    if any(dump is None for _, dump in dumps):
        return "(install py-spy for the ranks' stacks)"
    return "\n".join(f"--- pid {pid} ---\n{dump}" for pid, dump in dumps)


def spawn(fn: Callable, world_size: int = 2, *args, timeout_s: float = SPAWN_TIMEOUT_S) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by a gloo group.

    ``fn`` must be a module-level function (it is pickled). A failure on any rank fails the test;
    so does a run past ``timeout_s``, with every rank's stacks in the message, and no rank left.
    """
    ctx = mp.start_processes(_spawn_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            stacks = stacks_of(ctx.pids())
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join(timeout=10)
            pytest.fail(f"{fn.__name__} on {world_size} spawned ranks still running after {timeout_s:.0f} s "
                        f"(a hang); the ranks' stacks:\n{stacks}", pytrace=False)


@pytest.fixture
def ok():
    """Assert a CompletedProcess succeeded, showing its output otherwise."""

    def check(proc: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
        assert proc.returncode == code, f"exit {proc.returncode} (wanted {code})\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-8000:]}"
        return proc

    return check
