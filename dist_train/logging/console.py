"""Console logging that names the rank on every line.

Rank 0 logs at the configured level; other ranks log warnings and errors only, so a 64-rank
job prints one stream of progress but every rank's problems.
"""
from __future__ import annotations

import logging
import sys

from dist_train.env.cluster import ClusterEnv

FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"


def setup_console(cluster: ClusterEnv, level: str = "INFO") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT.format(rank=cluster.rank), datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level) if cluster.is_rank0 else logging.WARNING)
    # Chatty libraries stay quiet unless something is wrong.
    for name in ("urllib3", "mlflow", "alembic", "git", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
