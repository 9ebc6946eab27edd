"""The user's own dataset: points on three noisy rings, kept in a CSV file it writes on first use."""
import csv
import os

import numpy as np
import torch
from torch.utils.data import Dataset

HERE = os.path.dirname(os.path.abspath(__file__))


def make_csv(path: str, n: int = 3000, seed: int = 0) -> str:
    """Write n points (x, y, ring) to a CSV file once; later calls reuse it."""
    if not os.path.exists(path):
        rng = np.random.default_rng(seed)
        ring = rng.integers(0, 3, n)
        angle = rng.uniform(0, 2 * np.pi, n)
        radius = 1.0 + ring + rng.normal(0, 0.25, n)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["x", "y", "ring"])
            for r, a, k in zip(radius, angle, ring):
                writer.writerow([f"{r * np.cos(a):.5f}", f"{r * np.sin(a):.5f}", int(k)])
        os.replace(tmp, path)  # atomic: two ranks writing at once both leave a whole file
    return path


class RingsCSV(Dataset):
    """Items are (features, label): the plain PyTorch Dataset protocol."""

    def __init__(self, path: str, train: bool = True):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        split = int(0.8 * len(rows))
        rows = rows[:split] if train else rows[split:]
        self.x = torch.tensor([[float(r["x"]), float(r["y"])] for r in rows])
        self.y = torch.tensor([int(r["ring"]) for r in rows])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def build(args):
    """What `data.name=data:build` calls with data.args: returns (train, eval) and what it knows."""
    path = make_csv(os.path.join(HERE, args.get("file", "rings.csv")), n=int(args.get("samples", 3000)))
    return RingsCSV(path, train=True), RingsCSV(path, train=False), {"num_classes": 3}
