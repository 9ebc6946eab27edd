"""``resnet18``: torchvision's ResNet-18, randomly initialised, adapted to the dataset's images.

Adaptations (the rest is torchvision's ``resnet18(weights=None)``; pretrained weights are
never loaded):

- ``conv1`` takes the dataset's C channels instead of 3.
- Small images (H <= 32, e.g. MNIST or CIFAR): ``conv1`` is a 3x3 stride-1 conv and the max-pool
  is dropped, the usual CIFAR variant. The ImageNet stem (7x7 stride 2 + max-pool) would shrink a
  32x32 image to 8x8 before the first block and lose most of its detail.
- A Dropout before ``fc`` when ``model.dropout`` > 0.

BatchNorm: ResNet keeps its BatchNorm layers, and their statistics are per rank (no
SyncBatchNorm): each rank normalises with the mean and variance of its own micro-batch, so a
multi-rank run is not bitwise the same as one process with the same global batch. Running
averages are per rank too while training (DDP overwrites them with rank 0's at each forward, by
its default ``broadcast_buffers``); every checkpoint, evaluation and fit's hand-back takes rank 0's
under every strategy (``Strategy.sync_buffers``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from dist_train.models.cnn import image_shape

# Inputs up to this height use the small-image stem (3x3 stride-1 conv1, no max-pool).
SMALL_IMAGE_MAX_SIDE = 32


class ResNet18(ResNet):
    """torchvision ResNet-18 with a stem chosen for the input size and an optional head dropout."""

    block_classes: tuple[type[nn.Module], ...] = (BasicBlock,)

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, dropout: float):
        # Same architecture as torchvision.models.resnet18(weights=None, num_classes=...).
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        channels, height, _ = input_shape
        if height <= SMALL_IMAGE_MAX_SIDE:
            self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif channels != 3:
            self.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, C, H, W] float images -> [B, num_classes] logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))

    @torch.no_grad()
    def init_weights(self) -> None:
        """torchvision's ResNet init, in module order; also resets BatchNorm running statistics."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                # Weight 1, bias 0, running mean 0, var 1, num_batches_tracked 0: after
                # to_empty() these buffers hold garbage, so they must be reset here too.
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                module.reset_parameters()


def build_resnet18(cfg: Any, info: Any) -> ResNet18:
    """Build ``resnet18`` for an image classification dataset (registered lazily in ``models/__init__.py``)."""
    return ResNet18(image_shape(cfg, info), int(info.num_classes), float(cfg.dropout))
