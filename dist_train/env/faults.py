"""Fault injection for tests of the recovery paths: ``debug.faults``, parsed once at start-up.

    debug.faults="after_shards@45,step_sleep=0.1"

    after_shards[@STEP]   every rank exits (os._exit(FAULT_EXIT)) after writing its checkpoint
                          files and before the commit (at every save, or only at STEP)
    slow_write=SECONDS    sleep before writing a checkpoint's shards (makes async saves observable)
    step_sleep=SECONDS    sleep after each optimizer step (gives a test time to send a signal)

Production runs leave ``debug.faults`` empty: then every call here is a dictionary lookup that
finds nothing. Components that can be faulted receive the parsed ``Faults`` object.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, Optional

log = logging.getLogger(__name__)

FAULT_EXIT = 86
from dist_train.config.schema import FAULTS as KNOWN  # noqa: E402  (one list, in the config)


class Faults:
    """The parsed ``debug.faults`` setting."""

    def __init__(self, spec: str = ""):
        self.entries: Dict[str, Optional[str]] = {}
        for item in filter(None, (x.strip() for x in (spec or "").split(","))):
            key, _, value = item.partition("=")
            if "@" in key:
                key, value = key.split("@", 1)
            if key not in KNOWN:
                raise ValueError(f"unknown fault {key!r}; known: {', '.join(KNOWN)}")
            self.entries[key] = value or None

    def crash_point(self, name: str, step: int) -> None:
        """Exit the process hard here if this point (and this step) is named."""
        if name in self.entries and (self.entries[name] is None or int(self.entries[name]) == step):
            log.error("debug.faults: exiting at %s of step %d", name, step)
            logging.shutdown()
            os._exit(FAULT_EXIT)

    def delay(self, name: str) -> None:
        value = self.entries.get(name)
        if value:
            time.sleep(float(value))


NO_FAULTS = Faults()
