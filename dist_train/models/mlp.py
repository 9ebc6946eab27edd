"""``mlp``: a two-hidden-layer perceptron on flattened inputs, for any classification dataset."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dist_train.models.registry import register_model


class MLPBlock(nn.Module):
    """Linear -> ReLU -> optional Dropout: a hidden layer, and the unit FSDP shards."""

    def __init__(self, in_features: int, out_features: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(self.linear(x)))


class MLP(nn.Module):
    """Flatten -> Linear(hidden) -> ReLU -> Dropout -> Linear(hidden) -> ReLU -> Linear(num_classes)."""

    block_classes: tuple[type[nn.Module], ...] = (MLPBlock,)

    def __init__(self, in_features: int, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden1 = MLPBlock(in_features, hidden, dropout)
        # Dropout only after the first hidden layer, as the spec of this model says.
        self.hidden2 = MLPBlock(hidden, hidden, 0.0)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, *input_shape] -> [B, num_classes] logits."""
        return self.out(self.hidden2(self.hidden1(self.flatten(x))))

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default init for every linear layer, in module order."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


@register_model("mlp", tasks=("classification",))
def build_mlp(cfg: Any, info: Any) -> MLP:
    """Build the ``mlp`` model for a classification dataset of any input shape."""
    in_features = math.prod(int(d) for d in info.input_shape)
    return MLP(in_features, int(info.num_classes), int(cfg.hidden), float(cfg.dropout))
