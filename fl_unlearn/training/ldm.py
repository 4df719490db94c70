"""The latent diffusion model's local training loop: ε-prediction on cached latents with label dropout."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from fl_unlearn.models.diffusion import NULL_CLASS
from fl_unlearn.training.common import autocast, batch_indices, model_device


@dataclass(frozen=True)
class LDMTrainConfig:
    steps: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    loss: str = "l2"  # "l1" is Medfusion's; SISS, SalUn and KL-Away use squared L2
    label_dropout: float = 0.2  # share of samples trained unconditionally, for classifier-free guidance
    weight_decay: float = 0.0
    bf16: bool = False
    seed: int = 0


def noise_batch(scheduler: DDPMScheduler, z0: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_t, t, ε) for a batch of clean latents, t uniform over the whole schedule, on ``z0``'s device."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=generator).to(z0.device)
    eps = torch.randn(z0.shape, generator=generator).to(z0.device)
    return scheduler.add_noise(z0, eps, t), t, eps


def epsilon_error(pred: torch.Tensor, eps: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample mean error [B]; the unlearning losses reweight it per sample."""
    err = (pred.float() - eps).abs() if loss == "l1" else (pred.float() - eps) ** 2
    return err.flatten(1).mean(1)


def diffusion_loss(unet: UNet2DModel, scheduler: DDPMScheduler, z0: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator, loss: str = "l2") -> torch.Tensor:
    """The plain conditional diffusion loss L_DM on a batch (no label dropout)."""
    zt, t, eps = noise_batch(scheduler, z0, generator)
    return epsilon_error(unet(zt, t, class_labels=labels).sample, eps, loss).mean()


def train_ldm(unet: UNet2DModel, scheduler: DDPMScheduler, latents: np.ndarray, labels: np.ndarray,
              config: LDMTrainConfig, optimizer_state: dict | None = None) -> dict:
    """Train ``unet`` in place on normalised latents [N,C,h,w] with labels [N] in {0, 1}.

    ``optimizer_state`` continues AdamW's moments from an earlier call (a hospital's previous round);
    the returned ``optimizer_state`` is the one to pass next time.
    """
    if config.loss not in ("l1", "l2"):
        raise ValueError(f"ldm loss {config.loss!r} is not 'l1' or 'l2'")
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    z_all = torch.as_tensor(latents).float()
    y_all = torch.as_tensor(labels).long()
    device = model_device(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    unet.train()
    total = 0.0
    start = time.perf_counter()
    for idx in batch_indices(len(z_all), config.batch_size, config.steps, rng):
        y = y_all[idx].clone()
        y[torch.rand(len(y), generator=gen) < config.label_dropout] = NULL_CLASS
        zt, t, eps = noise_batch(scheduler, z_all[idx].to(device), gen)
        with autocast(config.bf16, device):
            pred = unet(zt, t, class_labels=y.to(device)).sample
        loss = epsilon_error(pred, eps, config.loss).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    unet.eval()
    return {"loss": total / max(config.steps, 1), "seconds": time.perf_counter() - start,
            "examples": len(z_all), "steps": config.steps, "optimizer_state": optimizer.state_dict()}
