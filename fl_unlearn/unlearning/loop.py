"""The one local unlearning loop (any registered method), the SalUn saliency mask, and the forget/remain batches."""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from fl_unlearn.errors import DataError
from fl_unlearn.training.common import autocast, model_device
from fl_unlearn.training.ldm import diffusion_loss
from fl_unlearn.unlearning.methods import Batch, UnlearnConfig, get_method


def _as_batch(latents: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> Batch:
    return torch.as_tensor(latents).float(), torch.as_tensor(labels).long()


def class_matched(remain_labels: torch.Tensor, wanted: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Indices into the remain set, one per ``wanted`` label, each of that label (SISS pairs).

    Every wanted label must occur in the remain set (the loop drops forget samples of absent classes).
    """
    out = torch.empty(len(wanted), dtype=torch.long)
    for label in wanted.unique():
        pool = torch.nonzero(remain_labels == label).flatten()
        slots = torch.nonzero(wanted == label).flatten()
        out[slots] = pool[torch.randint(len(pool), (len(slots),), generator=gen)]
    return out


def unlearn(unet: UNet2DModel, theta0: UNet2DModel, scheduler: DDPMScheduler, method: str,
            forget: tuple[np.ndarray, np.ndarray] | None, remain: tuple[np.ndarray, np.ndarray],
            config: UnlearnConfig, *, mask: dict[str, torch.Tensor] | None = None, seed: int = 0) -> dict:
    """``config.steps`` steps of ``method`` on ``unet`` in place, from normalised latents and labels.

    ``forget`` is None at a hospital without forget patients (remain loss only). ``theta0`` is the
    frozen original model. ``mask`` (SalUn): parameter name → bool tensor of the weights allowed to
    change; the gradient is masked after clipping and the other weights stay bit-identical.
    """
    objective, needs_mask = get_method(method)
    if needs_mask and mask is None:
        raise ValueError(f"method {method!r} needs a saliency mask")
    z_r, y_r = _as_batch(*remain)
    z_f, y_f = _as_batch(*forget) if forget is not None and len(forget[0]) else (None, None)
    if not len(z_r) and z_f is None:
        raise DataError("unlearning needs a forget or a remain set; both are empty")
    gen = torch.Generator().manual_seed(seed)
    device = model_device(unet)  # data and random draws stay on the CPU; batches move
    mask = {name: m.to(device) for name, m in mask.items()} if mask is not None else None
    theta0.eval()  # only ever called under no_grad
    unet.train()
    params = dict(unet.named_parameters())
    frozen = {name: p.detach().clone() for name, p in params.items()} if mask is not None else {}
    # No weight decay: decoupled decay would move masked (and all other) weights regardless of the loss.
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    totals: dict[str, float] = {}
    start = time.perf_counter()
    remain_classes = y_r.unique()
    for _ in range(config.steps):
        forget_batch, remain_batch = None, None
        ri = torch.randint(len(z_r), (config.batch_size,), generator=gen) if len(z_r) else None
        if z_f is not None:
            fi = torch.randint(len(z_f), (min(config.batch_size, len(z_f)),), generator=gen)
            if method == "siss" and ri is not None:
                # SISS pairs each forget latent with a remain latent of its class; a class the remain set
                # lacks cannot be paired, so its forget samples sit this step out.
                fi = fi[torch.isin(y_f[fi], remain_classes)]
                ri = class_matched(y_r, y_f[fi], gen) if len(fi) else ri
            forget_batch = (z_f[fi].to(device), y_f[fi].to(device)) if len(fi) else None
        if ri is not None:
            remain_batch = (z_r[ri].to(device), y_r[ri].to(device))
        optimizer.zero_grad(set_to_none=True)
        with autocast(config.bf16, device):
            parts = objective(unet, theta0, scheduler, forget_batch, remain_batch, gen, config)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
        if mask is not None:
            for name, p in params.items():
                if p.grad is not None:
                    p.grad.mul_(mask[name].to(p.grad.dtype))
        optimizer.step()
        if mask is not None:
            with torch.no_grad():  # belt and braces: masked weights keep their θ0 bits exactly
                for name, p in params.items():
                    p.copy_(torch.where(mask[name], p, frozen[name]))
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
    unet.eval()
    stats = {k: v / config.steps for k, v in totals.items()}
    stats.update(seconds=time.perf_counter() - start, steps=config.steps)
    return stats


def saliency_scores(unet: UNet2DModel, scheduler: DDPMScheduler, forget: tuple[np.ndarray, np.ndarray], *,
                    batches: int = 4, batch_size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """SalUn's raw saliency at θ0: Σ_b clip(∇ L_DM(θ0; forget batch b)), signed, per parameter.

    The plain diffusion loss, not KL-Away's (whose gradient at θ0 is exactly zero). Summed signed
    gradients can be added across hospitals before the absolute value is taken.
    """
    z_f, y_f = _as_batch(*forget)
    if not len(z_f):
        raise DataError("saliency needs a non-empty forget set")
    gen = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    device = model_device(unet)
    unet.eval()
    for _ in range(batches):
        idx = torch.randint(len(z_f), (min(batch_size, len(z_f)),), generator=gen)
        unet.zero_grad(set_to_none=True)
        diffusion_loss(unet, scheduler, z_f[idx].to(device), y_f[idx].to(device), gen).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        for name, p in params.items():
            if p.grad is not None:
                total[name] += p.grad
    unet.zero_grad(set_to_none=True)
    return total


def saliency_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Global top ``fraction`` of |score| over all parameters → bool masks (exactly round(fraction·N) True)."""
    names = list(scores)
    flat = torch.cat([scores[n].abs().flatten().float() for n in names])
    keep = round(fraction * len(flat))
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    masks, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = chosen[offset: offset + size].view_as(scores[n])
        offset += size
    return masks
