"""Start one torchrun job the way a user would, and measure it from the outside.

Every runner of ``compare.py`` goes through :func:`torchrun`, so all are measured alike:

- peak memory: the largest resident set of any process of the job (a rank, in practice), from
  the kernel's accounting of the reaped process tree (``wait4``): no sampling, no overhead;
- output lines stamped with their arrival time, so rank 0's progress lines give a wall-clock
  rate of the steady-state steps without touching the code under test.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
# Launcher variables of an enclosing job (SLURM, an outer torchrun) would confuse the inner one.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


@dataclass
class Launch:
    """What came back from one job."""

    returncode: int
    seconds: float
    peak_rss_mib: float
    cpu_s: float  # user + system CPU time of the whole job (on a quiet machine: about wall x cores busy)
    lines: List[Tuple[float, str]] = field(default_factory=list)  # (time.perf_counter() at arrival, line)
    timed_out: bool = False

    def tail(self, n: int = 25) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(nproc: int) -> Dict[str, str]:
    """This environment, minus enclosing launcher variables, with this checkout first on the path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_")) and k not in _LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    # Each rank gets its share of the cores (every runner also sets it; this silences torchrun).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
    env["PYTHONUNBUFFERED"] = "1"  # lines arrive when they are written
    return env


def _has_cuda() -> bool:
    return Path("/dev/nvidia0").exists()


def torchrun(args: Sequence[str], nproc: int, timeout_s: float, cwd: Optional[Path] = None) -> Launch:
    """``python -m torch.distributed.run --nproc_per_node=NPROC ARGS``: wait, measure, return.

    The job runs in its own session; past ``timeout_s`` its whole process group is killed.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=job_env(nproc), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group: torchrun and its ranks
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    lines: List[Tuple[float, str]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter(), line.rstrip("\n")))
        # wait4 reports the job's rusage; on Linux ru_maxrss is the largest resident set of the
        # process and of every descendant it reaped (torchrun reaps its ranks), in KiB.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
        if proc.returncode is None:
            kill()
            proc.wait()
        proc.stdout.close()
    return Launch(proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024,
                  usage.ru_utime + usage.ru_stime, lines, expired.is_set())
