"""Console logging that names the rank on every line.

Rank 0 logs at the configured level; other ranks log warnings and errors only, so a 64-rank
job prints one stream of progress but every rank's problems.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

from dist_train.env.cluster import ClusterEnv

FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"


_bar_active = False  # rank 0's progress bar is drawn on stderr now


def set_bar_active(active: bool) -> None:
    """Progress says when its tqdm bar is on the terminal: log lines then go above it."""
    global _bar_active
    _bar_active = active


class _ConsoleHandler(logging.StreamHandler):
    """A stream handler that, while a progress bar is drawn, writes through ``tqdm.write``: the
    bar is cleared, the line printed and the bar drawn again below it (not a line glued to the
    bar's last frame)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _bar_active:
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # (logging's own policy: a failing handler reports, never raises)
            self.handleError(record)


def setup_console(cluster: ClusterEnv, level: str = "INFO", own_process: bool = True) -> Callable[[], None]:
    """The rank-tagged console. ``own_process`` (the CLI): on the root logger, which it takes
    over. Else (``dist_train.fit`` in a user's script) on the ``dist_train`` logger only, for the
    duration of the call: the user's own root handlers and level stay as they were (they were
    removed for good). Returns what puts the ``dist_train`` logger back as it was."""
    target = logging.getLogger() if own_process else logging.getLogger("dist_train")
    before = (target.level, target.propagate)
    for handler in list(target.handlers):
        if own_process or getattr(handler, "_dist_train", False):
            target.removeHandler(handler)
    handler = _ConsoleHandler(sys.stderr)
    handler._dist_train = True  # (ours: replaced by the next call, a user's are left alone)
    handler.setFormatter(logging.Formatter(FORMAT.format(rank=cluster.rank), datefmt="%H:%M:%S"))
    target.addHandler(handler)
    target.setLevel(getattr(logging, level) if cluster.is_rank0 else logging.WARNING)
    if not own_process:
        target.propagate = False  # (not printed twice by a user's root handler)
    else:
        logging.captureWarnings(True)  # Python warnings through this handler: tagged with the rank too

    def restore() -> None:
        if not own_process:
            target.removeHandler(handler)
            target.setLevel(before[0])
            target.propagate = before[1]

    # Chatty libraries stay quiet unless something is wrong.
    for name in ("urllib3", "mlflow", "alembic", "git", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return restore
