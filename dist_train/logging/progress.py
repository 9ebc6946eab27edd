"""Progress on rank 0: a bar on a terminal, periodic log lines otherwise (CI, files, SLURM)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Dict

from dist_train.logging.console import set_bar_active

log = logging.getLogger("dist_train.progress")


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``update(step, loss, samples_per_s)`` every step; draws or logs at its own cadence."""

    def __init__(self, total: int, start: int, mode: str, every: int, enabled: bool):
        self.total, self.start, self.every = total, start, max(every, 1)
        self.enabled = enabled
        use_bar = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if enabled and use_bar and mode != "off":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
            set_bar_active(True)  # (the console's log lines go above the bar meanwhile)
        self.lines = enabled and self.bar is None and mode != "off"  # (auto off a terminal, and lines)
        self.t0 = time.perf_counter()
        self._posted = None  # the metrics the bar's postfix shows

    def eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def update(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        loss, sps = metrics.get("loss"), metrics.get("samples_per_s")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics is self._posted:  # the reporter's dict is new at each logging step only
                return
            self._posted = metrics
            post = {"loss": f"{loss:.4f}" if loss is not None else "-"}
            if sps:
                post["samples/s"] = f"{sps:.0f}"
            if metrics.get("data_wait_pct") is not None:
                post["data"] = f"{metrics['data_wait_pct']:.0f}%"
            self.bar.set_postfix(post, refresh=False)
        elif self.lines and (step % self.every == 0 or step == self.total):
            parts = [f"step {step}/{self.total}"]
            for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"), ("samples_per_s", "{:.0f}"),
                             ("data_wait_pct", "{:.0f}%")):
                if metrics.get(key) is not None:
                    parts.append(f"{key} " + fmt.format(metrics[key]))
            parts.append(f"eta {_fmt_eta(self.eta(step))}")
            log.info(" | ".join(parts))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            set_bar_active(False)
