"""The cardiomegaly classifier's training loop and prediction (utility of a synthetic or real training set)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_unlearn.models.classifier import head, logits
from fl_unlearn.training.common import autocast, batch_indices, model_device, to_tensor


@dataclass(frozen=True)
class ClassifierTrainConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    bf16: bool = False
    seed: int = 0


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small shifts and exposure changes: the label (heart width / thorax width) survives both."""
    shift = torch.randint(-3, 4, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(2, 3))
    gain = 1.0 + 0.2 * (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5)
    return x * gain.to(x.device)


def train_classifier(model: nn.Module, images: np.ndarray, labels: np.ndarray, config: ClassifierTrainConfig) -> dict:
    """Class-balanced BCE (pos_weight) on uint8 images [N,H,W] with labels {0, 1}."""
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x_all, y_all = to_tensor(images), torch.tensor(np.asarray(labels, dtype=np.float32))
    pos = float(y_all.mean())
    device = model_device(model)
    pos_weight = torch.tensor((1 - pos) / max(pos, 1e-6), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    model.train()
    start, total = time.perf_counter(), 0.0
    for idx in batch_indices(len(x_all), config.batch_size, config.steps, rng):
        with autocast(config.bf16, device):
            out = logits(model, _augment(x_all[idx].to(device), gen))
        loss = F.binary_cross_entropy_with_logits(out.float(), y_all[idx].to(device), pos_weight=pos_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    model.eval()
    return {"loss": total / max(config.steps, 1), "seconds": time.perf_counter() - start}


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Probabilities of cardiomegaly [N]."""
    model.eval()
    x, device = to_tensor(images), model_device(model)
    return np.concatenate([torch.sigmoid(logits(model, x[i: i + batch_size].to(device))).cpu().numpy()
                           for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Penultimate features [N, D] of uint8 images: the domain features of "FID (domain features)"."""
    model.eval()
    captured: list[torch.Tensor] = []
    hook = head(model).register_forward_hook(
        lambda _m, inputs, _o: captured.append(inputs[0].detach().float().cpu()))
    try:
        x, device = to_tensor(images), model_device(model)
        for i in range(0, len(x), batch_size):
            logits(model, x[i: i + batch_size].to(device))
    finally:
        hook.remove()
    return torch.cat(captured).numpy()
