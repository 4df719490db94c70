"""Pixel/latent-space copy detection (Carlini et al. 2023): nearest-training distance over the local neighbourhood."""

from __future__ import annotations

import numpy as np
import torch


def nearest_neighbour_ratio(synthetic: np.ndarray, training: np.ndarray, *, neighbours: int = 50,
                            alpha: float = 0.5, batch_size: int = 512) -> dict:
    """Carlini's modified ℓ2: d₁ / (α · mean(d₁..d_n)) per synthetic image, with its nearest training index.

    An image whose ratio is < 1 sits much closer to one training image than to its other neighbours:
    a likely copy. Images are compared as float vectors in [0, 1] (pixels or latents alike).
    """
    train = torch.as_tensor(training.reshape(len(training), -1)).float()
    if training.dtype == np.uint8:
        train = train / 255.0
    k = min(neighbours, len(train))
    ratios, nearest, d1 = [], [], []
    for start in range(0, len(synthetic), batch_size):
        chunk = torch.as_tensor(synthetic[start: start + batch_size].reshape(-1, train.shape[1])).float()
        if synthetic.dtype == np.uint8:
            chunk = chunk / 255.0
        dist = torch.cdist(chunk, train)  # one batched matrix product, no per-image loop
        top, idx = dist.topk(k, dim=1, largest=False)
        ratios.append((top[:, 0] / (alpha * top.mean(1).clamp_min(1e-12))).numpy())
        nearest.append(idx[:, 0].numpy())
        d1.append(top[:, 0].numpy())
    ratio = np.concatenate(ratios)
    return {"ratio": ratio, "nearest": np.concatenate(nearest), "distance": np.concatenate(d1),
            "flagged": ratio < 1.0}
