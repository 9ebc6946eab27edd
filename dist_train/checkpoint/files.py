"""One checkpoint directory as a strategy sees it: the object a strategy's ``save_checkpoint`` /
``check_checkpoint`` / ``load_checkpoint`` is handed.

The strategy decides *what* to save (DCP state dicts, an engine's own files); this object decides
*where and how*: DCP files under ``dcp/`` read and written safely (``storage.py``), an engine's
folder ``native/``, and host-memory staging for background writes.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from dist_train.checkpoint import layout, storage


class CheckpointFiles:
    def __init__(self, path: str, group=None, stager=None):
        self.path = path
        self.group = group  # the checkpoint layer's own process group (None: the default one / none)
        self._stager = stager

    @property
    def dcp_dir(self) -> str:
        return os.path.join(self.path, layout.DCP_DIR)

    @property
    def native_dir(self) -> str:
        """A folder for an engine's own checkpoint files."""
        return os.path.join(self.path, layout.NATIVE_DIR)

    def write_state(self, state: Dict[str, Any]) -> None:
        """Collective: write this rank's share of a DCP state dict."""
        storage.save(state, self.dcp_dir, self.group)

    def read_state(self, state: Dict[str, Any]) -> None:
        """Collective: fill a DCP state dict (tensors allocated, sharded or not) in place."""
        storage.load(state, self.dcp_dir, self.group)

    def read_model(self) -> Dict[str, torch.Tensor]:
        """The consolidated model weights, on the CPU (no collective)."""
        return storage.load_full_model(self.dcp_dir)

    def stored_shapes(self) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
        """``{name: (shape, dtype)}`` of the stored model tensors."""
        return storage.tensor_shapes(self.dcp_dir)

    def stage(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """A host-memory copy of ``state`` (DTensors stay DTensors), so training may change the
        originals while the copy is written; the stager reuses its buffers for the next save."""
        if self._stager is None:
            return state
        return self._stager.stage(state)


class Stager:
    """Reusable host-memory staging (pinned on a GPU machine) for asynchronous saves."""

    def __init__(self):
        self._impl: Optional[Any] = None

    def stage(self, state: Dict[str, Any]) -> Dict[str, Any]:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._impl is None:
            cuda = torch.cuda.is_available()
            self._impl = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                      use_async_staging=False, use_non_blocking_copy=False))
        return self._impl.stage(state)

    def close(self) -> None:
        if self._impl is not None:
            self._impl.close()
            self._impl = None
