"""Where each rank's time goes: a phase clock for the step-time breakdown and goodput, and a
watchdog that explains a hang before the collective timeout does.

    clock = PhaseClock()
    with clock("data"): batch = next(data)              # the loop and train_step mark phases
    clock.take()  -> {"data": s, "forward_backward": s, ...}  seconds since the previous take

The watchdog thread reads only ``clock.phase`` / ``clock.entered``: when one phase has lasted far
longer than the recent median iteration (``dist.watchdog_factor`` x median, at least
``dist.watchdog_floor_s``), it writes every thread's Python stack of this rank (faulthandler;
plus ``py-spy dump`` when installed) to ``<run.dir>/hangs/`` and logs which rank, step and phase.
"""
from __future__ import annotations

import contextlib
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
from typing import Deque, Dict, Iterator, Optional

log = logging.getLogger("dist_train")

PHASES = ("data", "forward_backward", "optimizer", "checkpoint", "evaluation", "other")


def py_spy_dump(pid: int) -> Optional[str]:
    """Every thread's Python (and native) stack of process ``pid`` by ``py-spy dump``; None when
    py-spy is not installed (on PATH or next to this interpreter, as in a virtualenv)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if spy is None:
        return None
    try:
        out = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        return out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(py-spy dump failed: {exc})\n"


class PhaseClock:
    def __init__(self) -> None:
        self.phase = "other"
        self.entered = time.perf_counter()
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

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        previous = self.phase
        self._switch(name)
        try:
            yield
        finally:
            self._switch(previous)

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

    def median_iteration(self) -> Optional[float]:
        return statistics.median(self.iterations) if len(self.iterations) >= 3 else None


class Watchdog:
    """A daemon thread that dumps this rank's stacks when a phase stalls (once per stall)."""

    def __init__(self, clock: PhaseClock, run_dir: str, rank: int, factor: float, floor_s: float,
                 poll_s: float = 0.5):
        self.clock, self.rank, self.factor, self.floor_s, self.poll_s = clock, rank, factor, floor_s, poll_s
        self.dir = os.path.join(run_dir, "hangs")
        self.dumps = 0
        self._stop = threading.Event()
        self._reported = None
        self._thread = threading.Thread(target=self._watch, name="dist_train-watchdog", daemon=True)
        self._thread.start()

    def limit(self) -> float:
        median = self.clock.median_iteration()
        return max(self.floor_s, self.factor * median) if median else max(self.floor_s, 10 * self.floor_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            phase, entered, step = self.clock.phase, self.clock.entered, self.clock.step
            stalled = time.perf_counter() - entered
            if stalled > self.limit() and self._reported != (phase, entered):
                self._reported = (phase, entered)
                self._dump(phase, step + 1, stalled)

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
        self.dumps += 1
        log.error("rank %d seems hung: step %d has been in phase %s for %.0f s (recent median iteration %s s); "
                  "Python stacks of every thread in %s", self.rank, step, phase, stalled,
                  "-" if median is None else f"{median:.3f}", path)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
