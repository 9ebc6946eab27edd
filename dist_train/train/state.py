"""The loop's own progress counters: what a checkpoint must restore besides weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from dist_train.data.sampler import ORDER_VERSION


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done, in total across restarts
    epoch: int = 0                # current data epoch
    position: int = 0             # global samples of this epoch already consumed (all ranks)
    samples_seen: int = 0         # global samples consumed in total
    resumed_from_step: Optional[int] = None
    data_order: int = ORDER_VERSION  # how epoch orders are seeded (a checkpoint without it: 1)
    skipped_steps: int = 0        # optimizer steps not applied (fp16 overflow, or vetoed), in total
    nonfinite_steps: int = 0      # steps with a non-finite loss or gradient (train.nonfinite), in total
    # samples_seen at the last completed optimizer step (what a failed run's summary reports: the
    # batch of a step that never finished is consumed but not trained on); not checkpointed.
    samples_trained: int = 0

    def state_dict(self) -> dict:
        out = asdict(self)
        del out["samples_trained"]
        return out

    def load_state_dict(self, state: dict) -> None:
        self.data_order = 1  # (written before data orders were versioned)
        for key, value in state.items():
            if hasattr(self, key) and key != "samples_trained":
                setattr(self, key, value)
        self.samples_trained = self.samples_seen
