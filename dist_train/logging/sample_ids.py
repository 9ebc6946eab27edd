"""``debug.record_sample_ids``: each rank records the dataset indices of every micro-batch.

Used by the tests that prove a resume neither replays nor skips a sample; off in production.
"""
from __future__ import annotations

import json
from typing import Iterator

from dist_train.logging.jsonl import trim_jsonl


def record_sample_ids(batches: Iterator[tuple], state, path: str) -> Iterator[tuple]:
    """Pass micro-batches through, appending each one's dataset indices (the last element of the batch) to ``path``
    as ``{"step": the optimizer step it feeds, "ids": [...]}``. Records past the step the run
    (re)starts from belong to an abandoned timeline and are dropped first."""
    trim_jsonl(path, state.step)
    with open(path, "a", encoding="utf-8") as f:
        for batch in batches:
            f.write(json.dumps({"step": state.step + 1, "ids": batch[-1].tolist()}) + "\n")
            f.flush()
            yield batch
