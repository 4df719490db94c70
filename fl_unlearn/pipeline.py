"""Sampling: DDIM with classifier-free guidance, one recorded seed per image, latent (de)normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

from fl_unlearn.models.diffusion import NULL_CLASS
from fl_unlearn.training.common import autocast, model_device
from fl_unlearn.training.vae import decode_latents


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of the training latents: the UNet sees standardised latents."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _view(self, values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(self, z: np.ndarray | torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(z).float() - self._view(self.mean)) / self._view(self.std)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self._view(self.std) + self._view(self.mean)

    @staticmethod
    def moments(latents: np.ndarray) -> dict:
        """Sufficient statistics a hospital may share: per-channel sums, sums of squares and a count."""
        z = np.asarray(latents, dtype=np.float64)
        return {"sum": z.sum(axis=(0, 2, 3)).tolist(), "sumsq": (z**2).sum(axis=(0, 2, 3)).tolist(),
                "count": int(z.shape[0] * z.shape[2] * z.shape[3])}

    @classmethod
    def from_moments(cls, parts: list[dict]) -> LatentStats:
        count = sum(p["count"] for p in parts)
        s = np.sum([p["sum"] for p in parts], axis=0)
        ss = np.sum([p["sumsq"] for p in parts], axis=0)
        mean = s / count
        std = np.sqrt(np.maximum(ss / count - mean**2, 1e-12))
        return cls(tuple(float(m) for m in mean), tuple(float(v) for v in std))


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 25
    eta: float = 1.0
    guidance_scale: float = 2.0
    batch_size: int = 100
    #: bf16 autocast for the UNet's forward passes (2x faster on a bf16-capable CPU); the DDIM update
    #: itself stays in fp32.
    bf16: bool = False


def image_seeds(base_seed: int, count: int, offset: int = 0) -> np.ndarray:
    """One seed per synthetic image, reproducible from the run seed (image i always gets the same seed)."""
    ss = np.random.SeedSequence([int(base_seed), 7919])
    all_seeds = ss.generate_state(offset + count, dtype=np.uint32)
    return all_seeds[offset:].astype(np.int64)


@torch.no_grad()
def sample_latents(unet: UNet2DModel, scheduler: DDIMScheduler, labels: np.ndarray, seeds: np.ndarray,
                   shape: tuple[int, int, int], config: SamplerConfig) -> torch.Tensor:
    """Normalised latents [N,*shape]. Image i depends only on (labels[i], seeds[i]), not on its batch."""
    unet.eval()
    device = model_device(unet)  # the noise is drawn on the CPU: a seed gives one image anywhere
    out = []
    for start in range(0, len(labels), config.batch_size):
        y = torch.as_tensor(labels[start: start + config.batch_size]).long().to(device)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start: start + config.batch_size]]
        z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        scheduler.set_timesteps(config.steps)
        for t in scheduler.timesteps:
            with autocast(config.bf16, device):
                eps = guided_epsilon(unet, z, t, y, config.guidance_scale).float()
            noise = (torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
                     if config.eta > 0 else None)
            z = scheduler.step(eps, t, z, eta=config.eta, variance_noise=noise).prev_sample
        out.append(z.cpu())
    return torch.cat(out)


def guided_epsilon(unet: UNet2DModel, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                   guidance_scale: float) -> torch.Tensor:
    """ε̂ = ε(∅) + w·(ε(c) − ε(∅)); w = 1 is purely conditional (one forward pass)."""
    if guidance_scale == 1.0:
        return unet(z, t, class_labels=labels).sample
    null = torch.full_like(labels, NULL_CLASS)
    both = unet(torch.cat([z, z]), t, class_labels=torch.cat([labels, null])).sample
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def generate_images(vae: AutoencoderKL, unet: UNet2DModel, scheduler: DDIMScheduler, stats: LatentStats,
                    labels: np.ndarray, seeds: np.ndarray, config: SamplerConfig) -> np.ndarray:
    """uint8 synthetic images [N,H,W] for the given labels and seeds."""
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    z = sample_latents(unet, scheduler, labels, seeds, shape, config)
    return decode_latents(vae, stats.denormalize(z))
