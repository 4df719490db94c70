"""The autoencoder's local training loop (reconstruction + KL, optional SSIM) and latent encoding/decoding."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from fl_unlearn.training.common import autocast, batch_indices, cycle_lrs, model_device, to_tensor, to_uint8


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6  # Medfusion's embedding_loss_weight
    ssim_weight: float = 0.0
    #: Weight of the mean of each image's largest 1% pixel errors: the autoencoder's L1 is spent on the
    #: large smooth areas, and 1-2 px granulomas (a few pixels of 4,096) are what it gives up first.
    hard_pixel_weight: float = 0.0
    bf16: bool = False
    seed: int = 0
    #: With ``total_steps``, these steps are steps ``start_step …`` of one one-cycle schedule over all
    #: FedAvg rounds (as for the re-identification networks); without, the learning rate is constant.
    start_step: int = 0
    total_steps: int | None = None


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean structural similarity with a uniform window, images in [-1, 1]."""
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    pool = lambda t: F.avg_pool2d(t, window, stride=1, padding=window // 2, count_include_pad=False)
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx**2, pool(y * y) - my**2, pool(x * y) - mx * my
    return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, config: VAETrainConfig, generator: torch.Generator) -> dict:
    """L1 reconstruction of a posterior sample + weighted KL (+ 1 − SSIM); returns the parts for logging."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    error = (recon.float() - x).abs().flatten(1)
    rec = error.mean()
    kl = posterior.kl().mean()
    loss = rec + config.kl_weight * kl
    parts = {"rec": rec, "kl": kl}
    if config.hard_pixel_weight > 0:
        hard = error.topk(max(1, error.shape[1] // 100), dim=1).values.mean()
        loss = loss + config.hard_pixel_weight * hard
        parts["hard"] = hard
    if config.ssim_weight > 0:
        s = ssim(recon.float(), x)
        loss = loss + config.ssim_weight * (1 - s)
        parts["ssim"] = s
    parts["loss"] = loss
    return parts


def train_vae(vae: AutoencoderKL, images: np.ndarray, config: VAETrainConfig,
              optimizer_state: dict | None = None) -> dict:
    """Train ``vae`` in place for ``config.steps`` steps on uint8 images [N,H,W]; returns mean losses
    and AdamW's ``optimizer_state`` (pass it back to continue the moments, e.g. in the next round)."""
    lrs = (cycle_lrs(config.lr, config.steps, config.start_step, config.total_steps)
           if config.total_steps is not None else [config.lr] * config.steps)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    data, device = to_tensor(images), model_device(vae)
    vae.train()
    totals: dict[str, float] = {}
    start = time.perf_counter()
    for step, idx in enumerate(batch_indices(len(data), config.batch_size, config.steps, rng)):
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        with autocast(config.bf16, device):
            parts = vae_loss(vae, data[idx].to(device), config, gen)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
    vae.eval()
    stats = {k: v / max(config.steps, 1) for k, v in totals.items()}
    stats.update(seconds=time.perf_counter() - start, examples=len(data), steps=config.steps,
                 optimizer_state=optimizer.state_dict())
    return stats


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Posterior means float32 [N,C,h,w]: deterministic, so cached latents, SISS weights and noising agree."""
    vae.eval()
    device = model_device(vae)
    out = [vae.encode(to_tensor(images[i: i + batch_size]).to(device)).latent_dist.mean.float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: np.ndarray | torch.Tensor, batch_size: int = 128) -> np.ndarray:
    """uint8 images [N,H,W] from latents [N,C,h,w]."""
    vae.eval()
    z, device = torch.as_tensor(latents).float(), model_device(vae)
    return np.concatenate([to_uint8(vae.decode(z[i: i + batch_size].to(device)).sample)
                           for i in range(0, len(z), batch_size)])


def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Encode (posterior mean) and decode: what a real image looks like after the autoencoder."""
    return decode_latents(vae, encode_latents(vae, images, batch_size), batch_size)
