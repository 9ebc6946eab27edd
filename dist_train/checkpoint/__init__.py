"""Checkpoints: sharded, synchronized across ranks, atomic, verified, portable across strategies
and world sizes. ``manager.py`` decides when and what; ``commit.py`` is the protocol every rank
follows to a committed checkpoint; ``restore.py`` chooses and loads; ``files.py`` is what a
strategy writes into and reads from; ``layout.py`` is the on-disk format and the atomic commit,
``retention.py`` what is kept and cleaned up; ``storage.py`` reads and writes
torch.distributed.checkpoint files (``decode.py``: without running code from them);
``export.py`` writes the model's plain weights (safetensors, or ``torch.save``'s format). ``python -m dist_train.checkpoint`` inspects and
exports.

The package never asks which strategy it checkpoints: a strategy saves and loads its own state
(``Strategy.save_checkpoint`` / ``check_checkpoint`` / ``load_checkpoint``).
"""
from dist_train.checkpoint.export import export_run, export_weights
from dist_train.checkpoint.manager import CheckpointManager
from dist_train.checkpoint.restore import CheckpointError, CheckpointRefused

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointRefused", "export_run", "export_weights"]
