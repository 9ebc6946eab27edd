"""The loop's own progress counters: what a checkpoint must restore besides weights."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done, in total across restarts
    epoch: int = 0                # current data epoch
    position: int = 0             # global samples of this epoch already consumed (all ranks)
    samples_seen: int = 0         # global samples consumed in total
    resumed_from_step: Optional[int] = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)
