"""Where each rank's time goes: a phase clock for the step-time breakdown and goodput, and a
watchdog that explains a hang before the collective timeout does.

    clock = PhaseClock()
    with clock("data"): batch = next(data)              # the loop and train_step mark phases
    clock.take()  -> {"data": s, "forward_backward": s, ...}  seconds since the previous take

The clock is made before the job is built (phase ``startup``) and the watchdog watches from then
until the process group is gone (phase ``teardown`` after the loop): a rank stuck in a collective
outside the loop explains itself too.

The watchdog thread reads only ``clock.phase`` / ``clock.entered`` / ``clock.progressed``: when
one phase has gone far longer without progress than the recent median iteration (``dist.watchdog_factor`` x median, at least
``dist.watchdog_floor_s``), it writes every thread's Python stack of this rank (faulthandler;
plus ``py-spy dump`` when installed), and the state and stacks of its child processes (DataLoader
workers), to ``<run.dir>/hangs/`` and logs which rank, step and phase. A phase made of many
small units of work (an evaluation's batches) calls ``clock.progress()`` after each: the limit
is then for one unit, not for the phase, which may rightly last far longer than an iteration.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from typing import Deque, Dict, List, Optional

log = logging.getLogger("dist_train")

PHASES = ("data", "forward_backward", "optimizer", "checkpoint", "evaluation", "other")
# Outside the loop (not in the step-time breakdown): building the job and resuming, then the
# hand-back of the weights, the summary's broadcast and the process group's end. Their collectives
# can hang as well; their length, like a checkpoint save's, does not follow the step's.
STARTUP, TEARDOWN = "startup", "teardown"
_UNPACED = ("checkpoint", STARTUP, TEARDOWN)
_MAX_CHILDREN = 8  # child processes whose stacks a hang dump includes


def py_spy_dump(pid: int, native: bool = False) -> Optional[str]:
    """Every thread's Python stack of process ``pid`` by ``py-spy dump`` (``native``: with the C
    frames between them, where a lock wait shows); None when py-spy is not installed (on PATH or
    next to this interpreter, as in a virtualenv)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if spy is None:
        return None
    try:
        out = subprocess.run([spy, "dump", "--pid", str(pid), *(["--native"] if native else [])],
                             capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        if native and out.returncode != 0:  # (no native unwinding here: the Python stacks at least)
            return py_spy_dump(pid)
        return out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(py-spy dump failed: {exc})\n"


def child_processes(pid: int) -> List[int]:
    """The live child processes of ``pid`` (a rank's DataLoader workers, its helpers), from /proc."""
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # (the name may hold spaces and parentheses)
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry))
    return sorted(children)


def describe_process(pid: int) -> str:
    """One line on process ``pid``: its command line, scheduler state and the kernel function it
    sleeps in (``futex_wait...``: a lock or condition; ``pipe_read``: waiting on a pipe)."""
    def read(name: str) -> str:
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return "?"

    state = read("stat").rsplit(")", 1)[-1].split()[:1]
    cmdline = read("cmdline").replace("\0", " ").strip()
    return (f"process {pid}: state {state[0] if state else '?'}, waiting in {read('wchan') or '-'}; "
            f"{cmdline[:300]}")


class PhaseClock:
    def __init__(self, phase: str = "other") -> None:
        self.phase = phase
        self.entered = time.perf_counter()
        self.progressed = self.entered  # the last progress() inside the current phase (the watchdog's)
        self.step = 0
        self.window: Dict[str, float] = defaultdict(float)   # since the last take()
        self.totals: Dict[str, float] = defaultdict(float)   # since start
        self.iterations: Deque[float] = deque(maxlen=50)      # recent iteration times (s)
        self._iteration_start = self.entered

    def _switch(self, name: str) -> None:
        now = time.perf_counter()
        spent = now - self.entered
        self.window[self.phase] += spent
        self.totals[self.phase] += spent
        self.phase, self.entered = name, now

    def __call__(self, name: str) -> "_Phase":
        """``with clock(name):`` the time inside counts as phase ``name`` (a dozen a step: a plain
        context object, a few times cheaper than a generator's)."""
        return _Phase(self, name)

    def progress(self) -> None:
        """A unit of work of the current phase is done (an evaluation batch): the watchdog measures
        a stall from now."""
        self.progressed = time.perf_counter()

    def stalled_since(self) -> float:
        """When this phase last showed progress (entered, or its latest ``progress()``)."""
        return max(self.entered, self.progressed)

    def iteration_done(self, step: int) -> None:
        now = time.perf_counter()
        self.iterations.append(now - self._iteration_start)
        self._iteration_start, self.step = now, step

    def take(self) -> Dict[str, float]:
        """Seconds per phase since the previous call (the phase in progress counted up to now)."""
        self._switch(self.phase)
        out = {p: self.window.get(p, 0.0) for p in PHASES}
        self.window.clear()
        return out

    def reset(self) -> None:
        """Start counting from now: the window and the totals (summary.json's ``time_breakdown``)
        cover the loop, not the start-up before it (goodput counts that as ``startup_s``); the
        time outside any phase is ``other`` from now."""
        self.window.clear()
        self.totals.clear()
        self.phase, self.entered = "other", time.perf_counter()

    def enter(self, name: str) -> None:
        """From now on the time is phase ``name`` (``teardown``, after the loop: no ``with``)."""
        self._switch(name)

    def median_iteration(self) -> Optional[float]:
        return statistics.median(self.iterations) if len(self.iterations) >= 3 else None


class _Phase:
    __slots__ = ("clock", "name", "previous")

    def __init__(self, clock: PhaseClock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.previous = self.clock.phase
        self.clock._switch(self.name)

    def __exit__(self, *exc) -> None:
        self.clock._switch(self.previous)


_CAP_SHARE = 0.75  # the watchdog fires by this share of the collective timeout at the latest


class Watchdog:
    """A daemon thread that dumps this rank's stacks when a phase stalls (once per stall)."""

    def __init__(self, clock: PhaseClock, run_dir: str, rank: int, factor: float, floor_s: float,
                 poll_s: float = 0.5, collective_timeout_s: float = float("inf"),
                 first_step_timeout_s: Optional[float] = None):
        self.clock, self.rank, self.factor, self.floor_s, self.poll_s = clock, rank, factor, floor_s, poll_s
        # A hang in a collective ends the job at its timeout: the stacks must be taken before. Until
        # the first step is done the collectives run under dist.init_timeout_s.
        self._cap_s = _CAP_SHARE * collective_timeout_s
        self._first_cap_s = self._cap_s if first_step_timeout_s is None else _CAP_SHARE * first_step_timeout_s
        self.dir = os.path.join(run_dir, "hangs")
        self.dumps = 0
        self._stop = threading.Event()
        self._reported = None
        self._thread = threading.Thread(target=self._watch, name="dist_train-watchdog", daemon=True)
        self._thread.start()

    @property
    def cap_s(self) -> float:
        return self._cap_s if self.clock.iterations else self._first_cap_s

    def limit(self) -> float:
        """How long the current phase may make no progress: ``factor`` x the recent median iteration,
        at least ``floor_s`` (10 x that before 3 iterations: a first step compiles, warms up); never
        past 3/4 of the collective timeout, which would end a hung job without its stacks. A
        checkpoint save (its time grows with the state, not with the step's), the start-up and the
        teardown have only that bound."""
        if self.clock.phase in _UNPACED:
            return self.cap_s if self.cap_s < float("inf") else max(self.floor_s, 10 * self.floor_s)
        median = self.clock.median_iteration()
        limit = max(self.floor_s, self.factor * median) if median else max(self.floor_s, 10 * self.floor_s)
        return min(limit, self.cap_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            phase, since, step = self.clock.phase, self.clock.stalled_since(), self.clock.step
            stalled = time.perf_counter() - since
            if stalled > self.limit() and self._reported != (phase, since):
                self._reported = (phase, since)
                self._dump(phase, step if phase == TEARDOWN else step + 1, stalled)

    def _dump(self, phase: str, step: int, stalled: float) -> None:
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"rank{self.rank:05d}-step{step:08d}-{phase}.txt")
        median = self.clock.median_iteration()
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"rank {self.rank}, step {step}, phase {phase}: no progress for {stalled:.1f} s "
                    f"(recent median iteration {median if median is None else round(median, 3)} s)\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            dump = py_spy_dump(os.getpid())
            if dump is not None:
                f.write("\n--- py-spy dump ---\n" + dump)
            # What this rank may be waiting for: its DataLoader workers (a worker stuck before
            # its first batch shows only here), with their C frames where py-spy can.
            for child in child_processes(os.getpid())[:_MAX_CHILDREN]:
                f.write(f"\n--- child {describe_process(child)} ---\n")
                f.flush()
                dump = py_spy_dump(child, native=True)
                if dump is not None:
                    f.write(dump)
        self.dumps += 1
        where = {STARTUP: f"the start-up before step {step} has", TEARDOWN: f"the teardown after step {step} has"}
        log.error("rank %d seems hung: %s been in phase %s for %.0f s (recent median iteration %s s); "
                  "Python stacks of every thread in %s", self.rank, where.get(phase, f"step {step} has"), phase,
                  stalled, "-" if median is None else f"{median:.3f}", path)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
