"""Each unlearning method's defining property, on tiny class-conditional UNets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fl_unlearn.errors import ConfigError, DataError
from fl_unlearn.models.diffusion import NoiseSchedule, UNetConfig, build_unet, train_scheduler
from fl_unlearn.training.ldm import LDMTrainConfig, epsilon_error, train_ldm
from fl_unlearn.unlearning import ALL_METHODS, UnlearnConfig, saliency_mask, saliency_scores, unlearn
from fl_unlearn.unlearning.methods import kl_away, kl_away_divergence, siss, siss_weights
from tests.test_generative import tiny_latents

TINY = UNetConfig(channels=(16, 32), layers_per_block=1, norm_groups=8)
SCHEDULER = train_scheduler(NoiseSchedule())


def _fixed_loss(unet, latents: np.ndarray, labels: np.ndarray, repeats: int = 16, seed: int = 123) -> float:
    """Diffusion loss with fixed noise and timesteps, so that two models are compared on the same draws."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.as_tensor(np.repeat(latents, repeats, axis=0))
    y = torch.as_tensor(np.repeat(labels, repeats))
    t = torch.randint(0, 1000, (len(z),), generator=gen)
    eps = torch.randn(z.shape, generator=gen)
    with torch.no_grad():
        return float(epsilon_error(unet(SCHEDULER.add_noise(z, eps, t), t, class_labels=y).sample, eps, "l2").mean())


@pytest.fixture(scope="module")
def overfit():
    """θ0: a tiny UNet overfit on 8 latents; the first 4 (2 per class) are "forget", the others "remain"."""
    torch.manual_seed(0)
    latents, labels = tiny_latents(8, seed=3), np.array([0, 1, 0, 1, 0, 1, 0, 1])
    unet = build_unet(TINY, 8, 4)
    train_ldm(unet, SCHEDULER, np.tile(latents, (2, 1, 1, 1)), np.tile(labels, 2),
              LDMTrainConfig(steps=600, batch_size=16, lr=3e-3, label_dropout=0.0, seed=0))
    return unet, (latents[:4], labels[:4]), (latents[4:], labels[4:])


def _copy(unet):
    return copy.deepcopy(unet)


def test_kl_away_forget_gradient_is_zero_at_theta0_and_the_term_is_capped(overfit):
    theta0, forget, _ = overfit
    unet = _copy(theta0)
    batch = tuple(torch.as_tensor(a) for a in forget)
    batch = (batch[0].float(), batch[1].long())

    divergence = kl_away_divergence(unet, theta0, SCHEDULER, batch, torch.Generator().manual_seed(0))
    (-divergence).backward()
    # zero up to float rounding (the graph-building pass may pick other conv kernels than no_grad)
    assert float(divergence) < 1e-10
    assert max(float(p.grad.abs().max()) for p in unet.parameters() if p.grad is not None) < 1e-6

    with torch.no_grad():  # move far from θ0: the term saturates at the cap
        for p in unet.parameters():
            p.add_(torch.randn_like(p))
    unet.zero_grad()
    config = UnlearnConfig(kl_cap=0.25)
    parts = kl_away(unet, theta0, SCHEDULER, batch, batch, torch.Generator().manual_seed(0), config)
    assert parts["divergence"] > config.kl_cap


def test_siss_weights_are_bounded_and_finite_for_realistic_latents():
    gen = torch.Generator().manual_seed(0)
    shape = (16, 8, 32, 32)  # Medfusion's latents: 8192 dimensions, Δ in the thousands
    zx, za, noise = (torch.randn(shape, generator=gen) for _ in range(3))
    for lam in (0.1, 0.5, 0.9):
        for sigma_value in (0.01, 0.3, 1.0):
            sigma = torch.full((16,), sigma_value)
            s = sigma.view(-1, 1, 1, 1)
            m = torch.where(torch.rand(16, 1, 1, 1, generator=gen) < lam, za + s * noise, zx + s * noise)
            w_x, w_a = siss_weights(m, zx, za, sigma, lam)
            assert torch.isfinite(w_x).all() and torch.isfinite(w_a).all()
            assert (w_x >= 0).all() and (w_x <= 1 / (1 - lam) + 1e-6).all()
            assert (w_a >= 0).all() and (w_a <= 1 / lam + 1e-6).all()


def _grads(unet) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_siss_limits_are_finetuning_and_gradient_ascent(overfit, lam):
    theta0, forget, remain = overfit
    f = (torch.as_tensor(forget[0]), torch.as_tensor(forget[1]).long())
    r = (torch.as_tensor(remain[0]), torch.as_tensor(remain[1]).long())
    unet = _copy(theta0)
    parts = siss(unet, theta0, SCHEDULER, f, r, torch.Generator().manual_seed(1),
                 UnlearnConfig(siss_lambda=lam, siss_scaling_norm=1.0))
    # Replay the same draws: t, ε, then the mixture coin flips.
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (4,), generator=gen)
    eps = torch.randn(f[0].shape, generator=gen)
    a = SCHEDULER.alphas_cumprod[t].view(-1, 1, 1, 1)
    source = f[0] if lam == 1.0 else r[0]
    plain = (((theta0(a.sqrt() * source + (1 - a).sqrt() * eps, t, class_labels=f[1]).sample - eps) ** 2)
             .flatten(1).mean(1).mean())
    key = "forget" if lam == 1.0 else "remain"
    assert parts[key] == pytest.approx(float(plain), rel=1e-4)  # weight ≡ 1 on the side the mixture draws from


def test_siss_needs_class_matched_pairs(overfit):
    theta0, forget, remain = overfit
    f = (torch.as_tensor(forget[0]), torch.tensor([0, 1, 0, 1]))
    r = (torch.as_tensor(remain[0]), torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ValueError, match="class-matched"):
        siss(_copy(theta0), theta0, SCHEDULER, f, r, torch.Generator(), UnlearnConfig())


def test_salun_mask_keeps_the_fraction_and_masked_weights_do_not_move(overfit):
    theta0, forget, remain = overfit
    scores = saliency_scores(theta0, SCHEDULER, forget, batches=2, batch_size=4)
    mask = saliency_mask(scores, 0.3)
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(0.3 * total)

    unet = _copy(theta0)
    unlearn(unet, theta0, SCHEDULER, "salun-kl-away", forget, remain, UnlearnConfig(steps=5, batch_size=4, lr=1e-2),
            mask=mask)
    before, after = dict(theta0.named_parameters()), dict(unet.named_parameters())
    moved = 0
    for name, m in mask.items():
        assert torch.equal(after[name][~m], before[name][~m]), name
        moved += int((after[name][m] != before[name][m]).sum())
    assert moved > 0


def test_gradient_ascent_raises_the_forget_loss(overfit):
    theta0, forget, remain = overfit
    unet = _copy(theta0)
    unlearn(unet, theta0, SCHEDULER, "ga", forget, remain, UnlearnConfig(steps=10, batch_size=4, lr=1e-3))
    assert _fixed_loss(unet, *forget) > 2 * _fixed_loss(theta0, *forget)


@pytest.mark.parametrize("method", ["kl-away", "siss", "salun-kl-away", "ga"])
def test_each_method_forgets_the_forget_set_more_than_the_remain_set(overfit, method):
    theta0, forget, remain = overfit
    unet = _copy(theta0)
    config = UnlearnConfig(steps=40, batch_size=8, lr=2e-3, siss_scaling_norm=0.5, kl_cap=1.0)
    mask = saliency_mask(saliency_scores(theta0, SCHEDULER, forget, batch_size=4), 0.5) if "salun" in method else None
    unlearn(unet, theta0, SCHEDULER, method, forget, remain, config, mask=mask, seed=0)

    forget_rise = _fixed_loss(unet, *forget) - _fixed_loss(theta0, *forget)
    remain_rise = _fixed_loss(unet, *remain) - _fixed_loss(theta0, *remain)
    assert forget_rise > 0
    assert forget_rise > 2 * remain_rise, (forget_rise, remain_rise)


def test_a_hospital_without_forget_patients_trains_on_its_remain_set(overfit):
    theta0, _, remain = overfit
    unet = _copy(theta0)
    stats = unlearn(unet, theta0, SCHEDULER, "kl-away", None, remain, UnlearnConfig(steps=3, batch_size=4))
    assert set(stats) >= {"remain", "seconds"} and "divergence" not in stats


def test_registry_and_config_errors(overfit):
    theta0, forget, remain = overfit
    assert set(ALL_METHODS) == {"kl-away", "siss", "salun-kl-away", "ga", "finetune-remain", "retrain"}
    with pytest.raises(ConfigError, match="unknown unlearning method 'erase'"):
        unlearn(_copy(theta0), theta0, SCHEDULER, "erase", forget, remain, UnlearnConfig())
    with pytest.raises(ConfigError, match="siss-lambda"):
        UnlearnConfig(siss_lambda=1.5)
    with pytest.raises(DataError, match="both are empty"):
        unlearn(_copy(theta0), theta0, SCHEDULER, "kl-away", None, (remain[0][:0], remain[1][:0]), UnlearnConfig())


@pytest.mark.parametrize("method", ["kl-away", "siss", "ga", "finetune-remain"])
def test_unpaired_classes_and_an_empty_remain_set_still_step(overfit, method):
    """A small hospital may lack a class in D_r, or have every patient in D_f."""
    theta0, forget, remain = overfit
    one_class = (remain[0][remain[1] == 0], remain[1][remain[1] == 0])
    empty = (remain[0][:0], remain[1][:0])
    for rest in (one_class, empty):
        unet = _copy(theta0)
        stats = unlearn(unet, theta0, SCHEDULER, method, forget, rest, UnlearnConfig(steps=2, batch_size=4))
        assert np.isfinite(list(stats.values())).all()
