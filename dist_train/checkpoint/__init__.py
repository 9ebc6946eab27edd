"""Checkpoints: sharded, synchronized across ranks, atomic, verified, portable across strategies
and world sizes. ``manager.py`` decides when and drives every rank; ``restore.py`` chooses and
loads; ``layout.py`` is the on-disk format and the atomic commit; ``storage.py`` reads and writes
torch.distributed.checkpoint files safely. ``python -m dist_train.checkpoint`` inspects and exports.
"""
from dist_train.checkpoint.manager import CheckpointManager
from dist_train.checkpoint.preemption import EXIT_PREEMPTED
from dist_train.checkpoint.restore import CheckpointError, CheckpointRefused

__all__ = ["CheckpointError", "CheckpointManager", "CheckpointRefused", "EXIT_PREEMPTED"]
