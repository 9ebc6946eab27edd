"""Goodput: how a run's wall time was spent, across restarts and requeues of the same run dir.

Rank 0 keeps ``<run.dir>/goodput.json``: one record per attempt (a process lifetime: the first
start, each torchrun restart, each SLURM requeue), updated at logging steps, so even an attempt
that was SIGKILLed leaves how far it got. The next attempt learns from it:

- **restart downtime**: from the previous attempt's last record to this attempt's start, unless the
  previous attempt completed the run and this one is a new launch, not a launcher's restart or
  requeue (a rerun of a finished run, or one that raises ``train.max_steps``, restarts nothing:
  the time between is the user's, not the run's; a restart means an attempt in between failed,
  perhaps before it wrote a record);
- **lost work**: the steps the previous attempt trained past the checkpoint this one resumes from
  (they are recomputed), and their time at that attempt's mean productive time per step.

Productive time is forward/backward plus the optimizer step (the phase clock's), less lost work;
goodput = productive / total wall time (attempts plus downtime).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

log = logging.getLogger("dist_train")

FILE = "goodput.json"


class GoodputLedger:
    def __init__(self, run_dir: str, enabled: bool, started_unix: float, every_s: float = 2.0):
        self.path = os.path.join(run_dir, FILE)
        self.enabled, self.every_s = enabled, every_s
        self.attempts: List[Dict[str, Any]] = []
        if enabled and os.path.isfile(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    self.attempts = list(json.load(f).get("attempts", []))
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("goodput: %s is unreadable (%s); counting from this attempt", self.path, exc)
        self.current: Dict[str, Any] = {"started": started_unix, "last_seen": started_unix, "resumed_from": 0,
                                        "reached": 0, "startup_s": 0.0, "phases": {}, "lost_steps": 0,
                                        "lost_s": 0.0, "downtime_s": 0.0}
        self._last_write = 0.0
        self.begun = False

    def begin(self, resumed_from: int, startup_s: float, logged_before: int = 0, relaunched: bool = False) -> None:
        """The loop starts at step ``resumed_from`` after ``startup_s`` of start-up;
        ``logged_before``: the last step the run dir's metrics.jsonl held before this attempt
        trimmed it (a killed attempt may have trained past its last ledger record); ``relaunched``:
        this process is a restart by torchrun or a requeue by SLURM."""
        cur = self.current
        self.begun = True
        cur.update(resumed_from=resumed_from, reached=resumed_from, startup_s=startup_s)
        if self.attempts:
            prev = self.attempts[-1]
            prev["reached"] = max(int(prev["reached"]), logged_before)
            # (a ledger written before "completed" was recorded counts every gap, as it did)
            new_launch = prev.get("completed") and not relaunched
            cur["downtime_s"] = 0.0 if new_launch else max(0.0, cur["started"] - prev["last_seen"])
            lost = max(0, int(prev["reached"]) - resumed_from)
            done = max(1, int(prev["reached"]) - int(prev["resumed_from"]))
            productive = sum(prev["phases"].get(p, 0.0) for p in ("forward_backward", "optimizer"))
            cur["lost_steps"], cur["lost_s"] = lost, lost * productive / done
            if lost and self.enabled:
                log.info("goodput: the previous attempt reached step %d; %d step(s) after the checkpoint of step %d "
                         "are recomputed", prev["reached"], lost, resumed_from)
        self._write(force=True)

    def maybe_update(self, step: int, clock) -> None:
        """After every step (rank 0 writes at most every ``every_s`` seconds)."""
        self.current["reached"] = step
        if self.enabled and time.time() - self._last_write >= self.every_s:
            self.current["phases"] = dict(clock.totals)
            self._write()

    def finish(self, step: int, clock, completed: bool = False) -> Dict[str, Any]:
        """The run's goodput so far (every attempt), written to the ledger; for summary.json.
        ``completed``: this attempt ended the run (trained to ``train.max_steps`` and evaluated it),
        not preempted or failed; the next attempt, if any, is then not a restart."""
        self.current["reached"] = max(self.current["reached"], step)
        self.current["completed"] = completed
        self.current["phases"] = dict(clock.totals)
        self._write(force=True)
        return self.summary()

    def summary(self) -> Dict[str, Any]:
        attempts = [*self.attempts, self.current]
        phases: Dict[str, float] = {}
        for a in attempts:
            for key, value in a["phases"].items():
                phases[key] = phases.get(key, 0.0) + value
        wall = sum(a["last_seen"] - a["started"] for a in attempts)
        downtime = sum(a["downtime_s"] for a in attempts)
        # An attempt killed before its first ledger write left no phase times: its lost steps are
        # priced at the run's mean productive time per step.
        steps = sum(max(0, int(a["reached"]) - int(a["resumed_from"])) for a in attempts)
        per_step = (phases.get("forward_backward", 0.0) + phases.get("optimizer", 0.0)) / max(steps, 1)
        lost = sum(a["lost_s"] or a["lost_steps"] * per_step for a in attempts)
        total = wall + downtime
        productive = max(0.0, phases.get("forward_backward", 0.0) + phases.get("optimizer", 0.0) - lost)
        out = {"total_s": total, "productive_s": productive, "startup_s": sum(a["startup_s"] for a in attempts),
               "data_wait_s": phases.get("data", 0.0), "checkpoint_s": phases.get("checkpoint", 0.0),
               "evaluation_s": phases.get("evaluation", 0.0), "restart_downtime_s": downtime, "lost_s": lost,
               "lost_steps": sum(a["lost_steps"] for a in attempts), "attempts": len(attempts)}
        out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
        out["goodput"] = round(productive / total, 4) if total > 0 else None
        return out

    def _write(self, force: bool = False) -> None:
        now = time.time()
        self.current["last_seen"] = now
        if not self.enabled or (not force and now - self._last_write < self.every_s):
            return
        self._last_write = now
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"attempts": [*self.attempts, self.current]}, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:  # bookkeeping must never stop training
            log.warning("goodput: cannot write %s: %s", self.path, exc)


def describe(goodput: Optional[Dict[str, Any]]) -> str:
    if not goodput or goodput.get("goodput") is None:
        return "goodput -"
    parts = [f"goodput {100 * goodput['goodput']:.1f}% of {goodput['total_s']:.1f} s"]
    for key in ("startup_s", "data_wait_s", "checkpoint_s", "evaluation_s", "restart_downtime_s", "lost_s"):
        if goodput.get(key):
            parts.append(f"{key[:-2].replace('_', ' ')} {goodput[key]:.1f} s")
    return ", ".join(parts)
