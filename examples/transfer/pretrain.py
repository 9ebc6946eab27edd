"""Make the "pretrained" weights this example starts from (weights cannot be downloaded here).

A plain PyTorch loop trains GrayResNet18 briefly on the first five Fashion-MNIST classes and saves
its state dict with torch.save, as any pretrained .pth file is saved. Fine-tuning (config.yaml)
then loads it with model.init_from, freezes the backbone and trains a new 10-class head.

    python pretrain.py [steps] [out.pt]
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import GrayResNet18  # noqa: E402


def main(steps: int = 60, out: str = "pretrained.pt") -> None:
    from dist_train.config import load_config
    from dist_train.data import build_datasets

    torch.manual_seed(0)
    train, _, _ = build_datasets(load_config(None, ["data.name=fashion_mnist"]).data)
    x, y = train.x, train.y  # Fashion-MNIST as tensors (Debian's dataset-fashion-mnist files)
    keep = y < 5
    x, y = x[keep], y[keep]
    model = GrayResNet18(num_classes=5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"pretrain step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    torch.save(model.state_dict(), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60, sys.argv[2] if len(sys.argv) > 2 else "pretrained.pt")
