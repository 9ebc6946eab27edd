"""Test-only fault injection, off unless DIST_TRAIN_FAULT is set (comma-separated entries):

    after_shards[@STEP]   every rank exits (os._exit(FAULT_EXIT)) after writing its checkpoint
                          files and before the commit (at every save, or only at STEP)
    slow_write=SECONDS    sleep before writing a checkpoint's shards (makes async saves observable)
    step_sleep=SECONDS    sleep after each optimizer step (gives a test time to send a signal)

It exists so that tests can crash a real run at the one moment that matters; nothing else reads it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Optional

log = logging.getLogger(__name__)

FAULT_EXIT = 86


def _entries() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for item in filter(None, (x.strip() for x in os.environ.get("DIST_TRAIN_FAULT", "").split(","))):
        key, _, value = item.partition("=")
        if "@" in key:
            key, value = key.split("@", 1)
        out[key] = value or None
    return out


def crash_point(name: str, step: int) -> None:
    """Exit the process hard here if DIST_TRAIN_FAULT names this point (and this step)."""
    entries = _entries()
    if name in entries and (entries[name] is None or int(entries[name]) == step):
        log.error("DIST_TRAIN_FAULT: exiting at %s of step %d", name, step)
        logging.shutdown()
        os._exit(FAULT_EXIT)


def delay(name: str) -> None:
    value = _entries().get(name)
    if value:
        time.sleep(float(value))
