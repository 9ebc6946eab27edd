"""torchvision's ResNet-18 for 1-channel images: the grayscale image is repeated into RGB, so the
parameter names (and any pretrained ResNet-18 state dict) are exactly torchvision's."""
import torch
from torchvision.models.resnet import BasicBlock, ResNet


class GrayResNet18(ResNet):
    def __init__(self, num_classes: int = 10):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def build(args, info):
    """`model.name=model:build`: the dataset's class count, unless model.args says otherwise."""
    return GrayResNet18(num_classes=int(args.get("num_classes", info.num_classes)))
