"""``debug.record_sample_ids``: each rank records the dataset indices of every micro-batch.

Used by the tests that prove a resume neither replays nor skips a sample; off in production.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator

from dist_train.data.registry import sample_indices
from dist_train.logging.jsonl import trim_jsonl


def trim_other_ranks(run_dir: str, world_size: int, step: int) -> None:
    """Rank 0, after a resume at a smaller world size: the files of ranks this run does not have
    lose their records past ``step`` too (an abandoned timeline that a check over every rank's
    file would take for replayed samples)."""
    for name in os.listdir(run_dir):
        match = re.fullmatch(r"sample_ids\.rank(\d+)\.jsonl", name)
        if match and int(match.group(1)) >= world_size:
            trim_jsonl(os.path.join(run_dir, name), step)


def record_sample_ids(batches: Iterator[tuple], state, path: str) -> Iterator[tuple]:
    """Pass micro-batches through, appending each one's dataset indices (the last element of the batch) to ``path``
    as ``{"step": the optimizer step it feeds, "ids": [...]}``. Records past the step the run
    (re)starts from belong to an abandoned timeline and are dropped first."""
    trim_jsonl(path, state.step)
    with open(path, "a", encoding="utf-8") as f:
        for batch in batches:
            index = sample_indices(batch)
            if index is None:
                raise ValueError("debug.record_sample_ids needs tuple or list batches (the loaders append the "
                                 f"indices to those); this dataset's batches are {type(batch).__name__}s")
            f.write(json.dumps({"step": state.step + 1, "ids": index.tolist()}) + "\n")
            f.flush()
            yield batch
