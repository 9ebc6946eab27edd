"""The user's own model: a plain nn.Module with nothing dist_train-specific."""
from torch import nn


class RingNet(nn.Module):
    """A small MLP that classifies 2-D points into concentric rings."""

    def __init__(self, hidden: int = 64, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


def build_net(args, info):
    """What `model.name=model:build_net` calls: model.args, and the dataset's description."""
    return RingNet(hidden=int(args.get("hidden", 64)), classes=int(args.get("classes", info.num_classes or 3)))
