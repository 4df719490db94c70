"""Patient re-identification networks (Packhäuser et al.): a retrieval embedding and a Siamese verifier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from fl_unlearn.errors import ConfigError, DataError

BACKBONES: tuple[str, ...] = ("small-cnn", "resnet18", "resnet50")


@dataclass(frozen=True)
class ReIDConfig:
    """Backbone and sizes shared by the retrieval and the verification network."""

    backbone: str = "resnet18"
    embedding_dim: int = 128
    input_size: int = 64  # images are resized to this square before the backbone

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"re-identification backbone {self.backbone!r} is unknown; choose one of {BACKBONES}")
        for name, lowest in (("embedding_dim", 1), ("input_size", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ConfigError(f"ReIDConfig.{name} must be an integer >= {lowest}, got {value!r}")


def to_input(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or float images ``[N,H,W]`` / ``[N,1,H,W]`` → float ``[N,1,size,size]``, each image standardised.

    Per-image zero mean and unit std: a visit's exposure and window differ, and must not be what
    identifies a patient (nor tell a decoded image from a real one). Floats may be in any range.
    """
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise DataError(f"re-identification expects grayscale images [N,H,W] or [N,1,H,W], got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)
    return (x - mean) / (std + 1e-4)


def _conv_block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Six conv-BN-ReLU layers (three halvings) and a pooled 4×4 map: ~20× faster than ResNet-18 on 2 CPU cores.

    The 4×4 map is flattened rather than averaged: identity lives in where the anatomy is (thorax
    width, dome heights, heart borders), which a global average would throw away.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), grid: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for width in widths:
            layers += _conv_block(cin, width, 2) + _conv_block(width, width, 1)
            cin = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid), nn.Flatten())
        self.out_features = widths[-1] * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def build_backbone(name: str, input_size: int = 64) -> tuple[nn.Module, int]:
    """A 1-channel feature extractor ``[N,1,S,S] → [N,F]`` and its F; torchvision ResNets are untrained.

    For inputs of at most 64 px the ResNet's max-pool is dropped, so its last stage still sees a
    4×4 map instead of 2×2.
    """
    if name == "small-cnn":
        net = SmallCNN()
        return net, net.out_features
    if name not in ("resnet18", "resnet50"):
        raise ConfigError(f"re-identification backbone {name!r} is unknown; choose one of {BACKBONES}")
    net = getattr(models, name)(weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if input_size <= 64:
        net.maxpool = nn.Identity()
    out_features = net.fc.in_features
    net.fc = nn.Identity()
    return net, out_features


class RetrievalNet(nn.Module):
    """Backbone → MLP → ``embedding_dim`` vector, trained with a contrastive loss.

    Convention: embeddings are compared as unit vectors under Euclidean distance. ``embed`` returns
    them L2-normalised, training feeds ``embed``'s output to the loss (whose default ``LpDistance``
    normalisation is then a no-op), and nearest-neighbour search must use ``embed``'s output too.
    """

    def __init__(self, config: ReIDConfig = ReIDConfig()) -> None:
        super().__init__()
        self.config = config
        self.backbone, features = build_backbone(config.backbone, config.input_size)
        hidden = 2 * max(config.embedding_dim, 128)
        self.head = nn.Sequential(
            nn.Linear(features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, config.embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of ``to_input`` images."""
        return self.head(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings: what training, the lookup table and the queries all use."""
        return F.normalize(self(x), dim=1)


class VerificationNet(nn.Module):
    """Siamese verifier: sigmoid features per image, logit = bias − Σ softplus(w) · |f(a) − f(b)|.

    The weights on the feature differences are non-positive by construction, so the logit never
    rises when any difference grows: an exact copy always scores the maximum, and a near-copy
    (blurred, autoencoded) can only fall below it by differing in features. The network is
    symmetric in its two images.
    """

    def __init__(self, config: ReIDConfig = ReIDConfig()) -> None:
        super().__init__()
        self.config = config
        self.backbone, features = build_backbone(config.backbone, config.input_size)
        self.features_layer = nn.Linear(features, config.embedding_dim)
        # softplus(0.5) ≈ 1: the head starts by summing the differences with unit weight.
        self.raw_weight = nn.Parameter(torch.full((config.embedding_dim,), 0.5))
        self.bias = nn.Parameter(torch.tensor(2.0))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image features in (0, 1), ``[N, embedding_dim]``."""
        return torch.sigmoid(self.features_layer(self.backbone(x)))

    def logit_from_difference(self, difference: torch.Tensor) -> torch.Tensor:
        """Same-patient logit of absolute feature differences ``[N, embedding_dim]``."""
        return self.bias - difference @ F.softplus(self.raw_weight)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Same-patient logits ``[N]`` of ``to_input`` image pairs."""
        both = self.features(torch.cat([a, b]))  # one pass keeps BatchNorm statistics shared
        return self.logit_from_difference(torch.abs(both[: len(a)] - both[len(a):]))

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Same-patient probabilities ``[N]`` in [0, 1]."""
        return torch.sigmoid(self(a, b))


class ReIDNetworks(nn.Module):
    """The pair a hospital trains and audits with; one state dict (``retrieval.*``, ``verification.*``) for FedAvg."""

    def __init__(self, config: ReIDConfig = ReIDConfig()) -> None:
        super().__init__()
        self.config = config
        self.retrieval = RetrievalNet(config)
        self.verification = VerificationNet(config)
