"""Start one torchrun job the way a user would, and measure it from the outside.

Every runner of ``compare.py`` goes through :func:`torchrun`, so all are measured alike:

- peak memory: the largest resident set of any process of the job (a rank, in practice), from
  the kernel's accounting of the reaped process tree (``wait4``): no sampling, no overhead;
- rank 0's progress lines (``[rank0] ... step K/N``; the reference runners print one at the end
  of the warm-up and of the last step, dist_train its own): at each, the arrival time and the CPU
  time used so far by the whole process tree. Between two marks that gives a wall-clock rate and
  the CPU seconds per step, measured identically for every runner, without touching the code
  under test. CPU time per step barely moves with load from other work, wall time does.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
# Launcher variables of an enclosing job (SLURM, an outer torchrun) would confuse the inner one.
PROGRESS = re.compile(r"\[rank0\].*\bstep (\d+)/(\d+)\b")
TICK = os.sysconf("SC_CLK_TCK")
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


@dataclass
class Launch:
    """What came back from one job."""

    returncode: int
    seconds: float
    peak_rss_mib: float
    cpu_s: float  # user + system CPU time of the whole job (on a quiet machine: about wall x cores busy)
    lines: List[Tuple[float, str]] = field(default_factory=list)  # (time.perf_counter() at arrival, line)
    # (step, arrival time, tree CPU s, the machine's stolen CPU s so far or None)
    marks: List[Tuple[int, float, float, Optional[float]]] = field(default_factory=list)
    timed_out: bool = False

    def tail(self, n: int = 25) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def steady(self, first_step: int, global_batch: int) -> Dict[str, Optional[float]]:
        """Wall samples/s, CPU s per step and the share of the cores' time stolen by the hypervisor
        (``steal_s``) between the first mark at ``first_step`` or later and the last mark: the
        timed steps; None when there are not two such marks."""
        marks = [m for m in self.marks if m[0] >= first_step]
        if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
            return {"wall_samples_per_s": None, "cpu_s_per_step": None, "timed_steal": None}
        (s0, t0, c0, st0), (s1, t1, c1, st1) = marks[0], marks[-1]
        steal = None if st0 is None or st1 is None else share_of_cores(st1 - st0, t1 - t0)
        return {"wall_samples_per_s": (s1 - s0) * global_batch / (t1 - t0), "cpu_s_per_step": (c1 - c0) / (s1 - s0),
                "timed_steal": steal}


def cpu_fields() -> Optional[List[int]]:
    """The all-cores line of ``/proc/stat`` (clock ticks since boot: user, nice, system, idle,
    iowait, irq, softirq, steal), or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return ([int(v) for v in f.readline().split()[1:]] + [0] * 8)[:8]
    except (OSError, ValueError):
        return None


def steal_s() -> Optional[float]:
    """CPU seconds the hypervisor has taken from this VM's cores since boot (``steal``): time its
    virtual CPUs wanted to run and could not, because other guests had the physical ones. The
    processes' own CPU time does not show it; their steps just take longer. None off Linux."""
    fields = cpu_fields()
    return None if fields is None else fields[7] / TICK


def share_of_cores(cpu_s: float, seconds: float) -> Optional[float]:
    """``cpu_s`` CPU seconds as a share (0 to 1) of what all cores had over ``seconds``."""
    return None if seconds <= 0 else max(0.0, cpu_s) / (seconds * (os.cpu_count() or 1))


def tree(pid: int) -> List[int]:
    """``pid`` and every live descendant (Linux /proc; just ``pid`` where that is unavailable)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` and every live descendant (Linux /proc)."""
    total = 0.0
    for p in tree(pid):
        try:
            # Fields after the ")" that ends the command name: utime and stime are the 12th and 13th.
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError, ValueError):  # gone meanwhile: counts nothing
            continue
    return total


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

    Past ``timeout_s`` (or if this process is interrupted) torchrun and every process under it
    are killed.
    """
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from dist_train.env.ports import free_port  # (below the ephemeral range: no race with clients; imports torch)

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=job_env(nproc), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        # torchrun puts each rank in a process group of its own: kill the whole tree, ranks first.
        for pid in reversed(tree(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    lines: List[Tuple[float, str]] = []
    marks: List[Tuple[int, float, float, Optional[float]]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter()
            lines.append((now, line.rstrip("\n")))
            mark = PROGRESS.search(line)
            if mark:
                marks.append((int(mark.group(1)), now, tree_cpu_s(proc.pid), steal_s()))
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
                  usage.ru_utime + usage.ru_stime, lines, marks, expired.is_set())
