"""Unlearning objectives for a class-conditional latent diffusion model, one function per method.

Each method fills the UNet's ``.grad`` for one step from a forget batch (None at a hospital without
forget patients: then only the remain loss acts) and a remain batch, and returns its loss terms for
logging. The loop in ``loop.py`` clips, applies a saliency mask and steps the optimiser. Equations,
defaults and pitfalls: the design's algorithms.md §1 (SISS) and §2 (SalUn, KL-Away, GA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel

from fl_unlearn.errors import ConfigError
from fl_unlearn.training.ldm import epsilon_error, noise_batch

Batch = tuple[torch.Tensor, torch.Tensor]  # (normalised latents [B,C,h,w], labels [B])


@dataclass(frozen=True)
class UnlearnConfig:
    """Hyperparameters of every method (each reads its own); defaults as documented in the README."""

    steps: int = 20  # local steps per federated round
    batch_size: int = 32
    lr: float = 1e-4
    max_grad_norm: float = 1.0  # total-gradient clipping, before any saliency mask
    forget_weight: float = 1.0  # weight of the forget term (KL-Away, GA) against the remain loss
    kl_cap: float = 1.0  # KL-Away: the divergence term is min(½‖ε_θ − ε_θ0‖², cap) per element on average
    siss_lambda: float = 0.5  # SISS mixture weight λ
    siss_scaling_norm: float = 0.1  # SISS: the forget gradient is rescaled to this norm
    saliency_fraction: float = 0.5  # SalUn: share of weights that may change
    bf16: bool = False  # bf16 autocast for the UNet passes, as the LDM was trained (1.4x faster on this CPU)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"unlearning needs steps >= 1 and batch size >= 1, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.siss_lambda <= 1.0:
            raise ConfigError(f"siss-lambda must be in [0, 1], got {self.siss_lambda}")
        if not 0.0 < self.saliency_fraction <= 1.0:
            raise ConfigError(f"saliency-fraction must be in (0, 1], got {self.saliency_fraction}")
        for name in ("lr", "max_grad_norm", "kl_cap", "siss_scaling_norm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"unlearning {name.replace('_', '-')} must be > 0, got {getattr(self, name)}")


def _params(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def _remain_loss(unet: UNet2DModel, scheduler: DDPMScheduler, remain: Batch | None,
                 gen: torch.Generator) -> torch.Tensor:
    """L_DM on the remain batch; 0 at a hospital whose every patient is to be forgotten."""
    if remain is None:
        return torch.zeros((), requires_grad=True)
    zt, t, eps = noise_batch(scheduler, remain[0], gen)
    return epsilon_error(unet(zt, t, class_labels=remain[1]).sample, eps, "l2").mean()


def finetune_remain(unet, theta0, scheduler, forget, remain, gen, config: UnlearnConfig) -> dict:
    """Naive deletion: the diffusion loss on D_r only (forget batch ignored)."""
    loss = _remain_loss(unet, scheduler, remain, gen)
    loss.backward()
    return {"remain": float(loss.detach())}


def gradient_ascent(unet, theta0, scheduler, forget, remain, gen, config: UnlearnConfig) -> dict:
    """GA / NegGrad: −L_DM(D_f) + L_DM(D_r). Unbounded: expected to collapse, kept as a reference row."""
    remain_loss = _remain_loss(unet, scheduler, remain, gen)
    if forget is None:
        remain_loss.backward()
        return {"remain": float(remain_loss.detach())}
    forget_loss = _remain_loss(unet, scheduler, forget, gen)
    (remain_loss - config.forget_weight * forget_loss).backward()
    return {"remain": float(remain_loss.detach()), "forget": float(forget_loss.detach())}


def kl_away_divergence(unet: UNet2DModel, theta0: UNet2DModel, scheduler: DDPMScheduler, forget: Batch,
                       gen: torch.Generator) -> torch.Tensor:
    """½‖ε_θ(z_t,t,c) − ε_θ0(z_t,t,c)‖² averaged over elements and batch, on the same (z_t, t, c) for both."""
    zt, t, _ = noise_batch(scheduler, forget[0], gen)
    with torch.no_grad():
        frozen = theta0(zt, t, class_labels=forget[1]).sample.float()
    return 0.5 * ((unet(zt, t, class_labels=forget[1]).sample.float() - frozen) ** 2).mean()


def kl_away(unet, theta0, scheduler, forget, remain, gen, config: UnlearnConfig) -> dict:
    """KL-Away: −min(divergence from θ0 on D_f, cap) + L_DM(D_r).

    The forget term's gradient is zero at θ = θ0 (a maximum of −½‖Δ‖²): the first updates come
    from the remain loss, then the divergence grows, and the cap keeps it from running away.
    """
    remain_loss = _remain_loss(unet, scheduler, remain, gen)
    if forget is None:
        remain_loss.backward()
        return {"remain": float(remain_loss.detach())}
    divergence = kl_away_divergence(unet, theta0, scheduler, forget, gen)
    (remain_loss - config.forget_weight * torch.clamp(divergence, max=config.kl_cap)).backward()
    return {"remain": float(remain_loss.detach()), "divergence": float(divergence.detach())}


def siss_weights(m: torch.Tensor, zx_scaled: torch.Tensor, za_scaled: torch.Tensor, sigma: torch.Tensor,
                 lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights (w_x, w_a) of the mixture sample ``m`` in the overflow-free sigmoid form.

    ``zx_scaled``/``za_scaled`` are γ_t·x and γ_t·a; ``sigma`` is σ_t per sample. w_x ≤ 1/(1−λ),
    w_a ≤ 1/λ, and both are finite for any Δ (λ = 0 or 1 give the limits exactly).
    """
    d_x = ((m - zx_scaled) ** 2).flatten(1).sum(1).double() / (2 * sigma.double() ** 2)
    d_a = ((m - za_scaled) ** 2).flatten(1).sum(1).double() / (2 * sigma.double() ** 2)
    delta = d_x - d_a
    if lam <= 0.0:
        return torch.ones_like(delta).float(), torch.exp(torch.clamp(-delta, max=80.0)).float()
    if lam >= 1.0:
        return torch.exp(torch.clamp(delta, max=80.0)).float(), torch.ones_like(delta).float()
    logit = math.log(lam / (1 - lam))
    w_x = torch.sigmoid(-delta - logit) / (1 - lam)
    w_a = torch.sigmoid(delta + logit) / lam
    return w_x.float(), w_a.float()


def siss(unet, theta0, scheduler, forget, remain, gen, config: UnlearnConfig) -> dict:
    """SISS (Alberti et al. 2025) as in its code: one forward pass on a λ-mixture of noised remain/forget
    latents sharing noise and timestep, importance-weighted naive-deletion and NegGrad terms, and
    grad = g_x − (S / ‖g_a‖)·g_a. ``remain`` must be class-matched to ``forget`` pair by pair.
    """
    if forget is None:
        return finetune_remain(unet, theta0, scheduler, None, remain, gen, config)
    # A hospital whose every patient is forgotten has no remain data to pair with: then the mixture is
    # the forget sample alone (the λ = 1 limit) and only the norm-fixed NegGrad term acts.
    has_remain = remain is not None
    (za, ya), (zx, yx) = forget, remain if has_remain else forget
    lam = config.siss_lambda if has_remain else 1.0
    if zx.shape != za.shape or not torch.equal(ya, yx):
        raise ValueError("SISS needs class-matched forget/remain pairs: the same label at each position")
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (len(za),), generator=gen)
    eps = torch.randn(za.shape, generator=gen).to(za.device)
    alphas = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1).to(za.device)
    t = t.to(za.device)
    gamma, sigma = alphas.sqrt(), (1 - alphas).sqrt()
    xt, at = gamma * zx + sigma * eps, gamma * za + sigma * eps
    pick_a = (torch.rand(len(za), generator=gen) < lam).view(-1, 1, 1, 1).to(za.device)
    m = torch.where(pick_a, at, xt)
    w_x, w_a = siss_weights(m, gamma * zx, gamma * za, sigma.view(-1), lam)
    pred = unet(m, t, class_labels=ya).sample.float()
    loss_x = (w_x * ((pred - (m - gamma * zx) / sigma) ** 2).flatten(1).mean(1)).mean()
    loss_a = (w_a * ((pred - (m - gamma * za) / sigma) ** 2).flatten(1).mean(1)).mean()
    params = _params(unet)

    def grads(loss: torch.Tensor, retain: bool) -> list[torch.Tensor]:
        found = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]

    g_x = grads(loss_x, retain=True) if has_remain else [torch.zeros_like(p) for p in params]
    g_a = grads(loss_a, retain=False)
    norm_a = torch.sqrt(sum((g.float() ** 2).sum() for g in g_a))
    scale = config.siss_scaling_norm / norm_a if norm_a > 0 else torch.tensor(0.0)
    for p, gx, ga in zip(params, g_x, g_a, strict=True):
        p.grad = gx - scale * ga
    return {"remain": float(loss_x.detach()) if has_remain else 0.0, "forget": float(loss_a.detach()),
            "forget_grad_norm": float(norm_a)}


Method = Callable[..., dict]

#: name → (objective, uses a saliency mask). ``retrain`` is not a step: it trains a fresh LDM on D_r.
METHODS: dict[str, tuple[Method, bool]] = {
    "kl-away": (kl_away, False),
    "siss": (siss, False),
    "salun-kl-away": (kl_away, True),
    "ga": (gradient_ascent, False),
    "finetune-remain": (finetune_remain, False),
}
BASELINES = ("retrain",)
ALL_METHODS = (*METHODS, *BASELINES)


def get_method(name: str) -> tuple[Method, bool]:
    if name not in METHODS:
        raise ConfigError(f"unknown unlearning method {name!r}; choose from {', '.join(ALL_METHODS)}")
    return METHODS[name]
