"""torch.distributed.checkpoint (DCP) reading and writing, without unpickling arbitrary objects.

DCP stores tensors in its own shard files and two things through pickle: its ``.metadata`` index
and non-tensor leaves (e.g. the optimizer's ``lr`` and ``betas``), which its default planner reads
with ``torch.load(weights_only=False)``. Here ``.metadata`` goes through an unpickler that only
builds DCP's own metadata classes (and torch sizes, dtypes, layouts), and non-tensor leaves through
``torch.load(weights_only=True)``: a crafted checkpoint cannot run code when it is loaded.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which a DCP index never holds; "
                                     "refusing to load it")


def read_metadata(dcp_dir: str) -> Metadata:
    """DCP's index of a checkpoint (tensor names, shapes, dtypes, shard locations)."""
    with open(os.path.join(dcp_dir, ".metadata"), "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{dcp_dir}/.metadata is not a DCP Metadata object")
    # DCP opens <dcp_dir>/<relative_path> for each piece: a crafted index could point outside.
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or rel in ("", ".", "..") or os.path.basename(rel) != rel or "\0" in rel:
            raise pickle.UnpicklingError(f"{dcp_dir}/.metadata names the data file {rel!r}, which is not a file "
                                         "of this directory; refusing to load it")
    return metadata


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose ``.metadata`` is read by the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(str(self.path))
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor leaves with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def save(state_dict: Dict[str, Any], dcp_dir: str, group=None) -> None:
    """Collective (every rank of ``group``): write this rank's share of ``state_dict``.

    DCP deduplicates replicated tensors (DDP) across ranks and writes sharded ones (FSDP) as
    shards; ``sync_files`` fsyncs every file it writes.
    """
    writer = dcp.FileSystemWriter(dcp_dir, sync_files=True)
    with _plain_errors("writing"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state_dict, storage_writer=writer, process_group=group, no_dist=not _distributed())


def load(state_dict: Dict[str, Any], dcp_dir: str, group=None) -> None:
    """Collective: fill ``state_dict`` (its tensors allocated, sharded or not) in place.

    The checkpoint may have been written at any world size and by any DCP strategy: DCP reads
    exactly the pieces this rank's tensors need.
    """
    with _plain_errors("reading"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state_dict, storage_reader=SafeReader(dcp_dir), planner=SafeLoadPlanner(),
                 process_group=group, no_dist=not _distributed())


class DCPError(RuntimeError):
    """A DCP read or write failed (on any rank: DCP reports every rank's failure to all)."""


@contextlib.contextmanager
def _plain_errors(what: str) -> Iterator[None]:
    # DCP's CheckpointException derives from BaseException: `except Exception` would miss it.
    try:
        yield
    except CheckpointException as exc:
        errors = {r: (e[0] if isinstance(e, tuple) else e) for r, e in getattr(exc, "failures", {}).items()}
        causes = "; ".join(f"rank {r}: {type(e).__name__}: {_gist(e)}" for r, e in sorted(errors.items()))
        raise DCPError(f"torch.distributed.checkpoint failed {what}: {causes or exc}") from exc


def _gist(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch.load's refusal puts the culprit ("unsupported GLOBAL ...") after a long preamble.
    return next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def tensor_shapes(dcp_dir: str, prefix: str = "model.") -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """``{name: (global shape, dtype)}`` of the tensors under ``prefix`` (prefix stripped)."""
    out = {}
    for key, meta in read_metadata(dcp_dir).state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            out[key[len(prefix):]] = (tuple(meta.size), meta.properties.dtype)
    return out


def load_tensors(dcp_dir: str, prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` (prefix stripped), consolidated (unsharded) on the CPU, in this
    one process, with no process group: for export, inspection and tests, whatever strategy and
    world size wrote the checkpoint. ``prefix="optim."`` gives the optimizer state."""
    template = {prefix + name: torch.empty(shape, dtype=dtype)
                for name, (shape, dtype) in tensor_shapes(dcp_dir, prefix).items()}
    with _plain_errors("reading"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(template, storage_reader=SafeReader(dcp_dir), planner=SafeLoadPlanner(), no_dist=True)
    return {key[len(prefix):]: value for key, value in template.items()}


def load_full_model(dcp_dir: str) -> Dict[str, torch.Tensor]:
    """The consolidated model weights of a checkpoint: ``{parameter/buffer name: tensor}``."""
    return load_tensors(dcp_dir, "model.")


def param_shape_mismatches(stored: Dict[str, Tuple[tuple, Any]], current: Dict[str, tuple],
                           limit: int = 5) -> Optional[str]:
    """A readable description of how two ``{name: shape}`` sets differ, else None."""
    problems = []
    missing = sorted(set(current) - set(stored))
    extra = sorted(set(stored) - set(current))
    if missing:
        problems.append(f"this model has parameters the checkpoint lacks: {', '.join(missing[:limit])}")
    if extra:
        problems.append(f"the checkpoint has parameters this model lacks: {', '.join(extra[:limit])}")
    wrong = [f"{k} {list(stored[k][0])} in the checkpoint vs {list(current[k])} here"
             for k in sorted(set(stored) & set(current)) if tuple(stored[k][0]) != tuple(current[k])]
    if wrong:
        problems.append("shapes differ: " + "; ".join(wrong[:limit]))
    return "; ".join(problems) or None
