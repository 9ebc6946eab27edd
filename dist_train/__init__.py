"""dist_train: distributed training for PyTorch.

    python -m dist_train [--config FILE] [key=value ...]          # the CLI
    dist_train.fit(model, train_data, eval_data, task, config)    # your own objects, same machinery

Names resolve lazily, so ``python -m dist_train --help`` does not import torch's heavy parts.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fit": "dist_train.api",
    "TrainingFailed": "dist_train.api",
    "ConfigError": "dist_train.config.schema",
    "register_model": "dist_train.plugins",
    "register_dataset": "dist_train.plugins",
    "register_task": "dist_train.train.tasks",
    "register_strategy": "dist_train.strategy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_train' has no attribute {name!r}")
