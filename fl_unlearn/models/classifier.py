"""The cardiomegaly classifier: a torchvision backbone on 1-channel radiographs, one logit."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models


def build_classifier(backbone: str = "resnet18") -> nn.Module:
    """ResNet-18 (``cpu``) or DenseNet-121 (``paper``), random init, 1 input channel, 1 output logit."""
    if backbone == "resnet18":
        net = models.resnet18(weights=None, num_classes=1)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return net
    if backbone == "densenet121":
        net = models.densenet121(weights=None, num_classes=1)
        net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return net
    if backbone == "small-cnn":
        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        return nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 64),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))
    raise ValueError(f"unknown classifier backbone {backbone!r}; expected small-cnn, resnet18 or densenet121")


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).squeeze(1)


def head(model: nn.Module) -> nn.Linear:
    """The final linear layer; its input is the classifier's penultimate (domain) feature vector."""
    for name in ("fc", "classifier"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Linear):
            return layer
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        return model[-1]
    raise ValueError(f"cannot find the final linear layer of {type(model).__name__}")
