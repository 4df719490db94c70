#!/usr/bin/env python3
"""Measure the generative model's speed on this machine: train throughput and GFLOP/s of the VAE and UNet
steps next to measured fp32/bf16 matmul rates, and DDIM sampling images/s. Sizes come from a preset.

    python scripts/bench_generative.py [--preset cpu] [--steps 10] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_unlearn.config import load_preset
from fl_unlearn.models.diffusion import build_unet, build_vae, sampling_scheduler, train_scheduler
from fl_unlearn.pipeline import LatentStats, SamplerConfig, generate_images
from fl_unlearn.training.common import autocast
from fl_unlearn.training.ldm import noise_batch
from fl_unlearn.training.vae import VAETrainConfig, vae_loss


def matmul_gflops(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), trials: int = 5) -> float:
    """The machine's attainable matmul rate: the best of ``trials`` timed runs at each size, after a warm-up,
    so that the reference the training steps are divided by is a peak, not one run's noise."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        repeats = max(2, int(4e10 // (2 * n**3)))  # about 40 GFLOP per trial
        for _ in range(2):
            a @ b
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def time_step(step, steps: int) -> tuple[float, float]:
    """(seconds per step, FLOPs per step) of a training step closure."""
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_preset(args.preset)
    results: dict = {"preset": args.preset, "threads": args.threads, "torch": torch.__version__,
                     "matmul_gflops": {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}}

    vae = build_vae(cfg.vae, cfg.image_size)
    unet = build_unet(cfg.unet, cfg.latent_size, cfg.vae.latent_channels)
    sched = train_scheduler(cfg.noise_schedule)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.vae_batch_size, 1, cfg.image_size, cfg.image_size) * 2 - 1
    z = torch.randn(cfg.ldm_batch_size, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)
    y = torch.randint(0, 2, (cfg.ldm_batch_size,))
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    unet_opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    for bf16 in (False, True):
        tag = "bf16" if bf16 else "fp32"

        def vae_step(bf16: bool = bf16):
            with autocast(bf16):
                loss = vae_loss(vae, x, VAETrainConfig(), gen)["loss"]
            vae_opt.zero_grad()
            loss.backward()
            vae_opt.step()

        def unet_step(bf16: bool = bf16):
            zt, t, eps = noise_batch(sched, z, gen)
            with autocast(bf16):
                pred = unet(zt, t, class_labels=y).sample
            loss = ((pred.float() - eps) ** 2).mean()
            unet_opt.zero_grad()
            loss.backward()
            unet_opt.step()

        for name, step, batch in (("vae", vae_step, len(x)), ("unet", unet_step, len(z))):
            seconds, flops = time_step(step, args.steps)
            gflops = flops / seconds / 1e9
            results[f"{name}_{tag}"] = {
                "batch": batch, "seconds_per_step": round(seconds, 4), "images_per_s": round(batch / seconds, 1),
                "gflop_per_step": round(flops / 1e9, 2), "gflops": round(gflops, 1),
                "fraction_of_matmul": round(gflops / results["matmul_gflops"][tag], 3)}

    sampler = SamplerConfig(steps=cfg.sample_steps, eta=cfg.sample_eta, guidance_scale=cfg.guidance_scale,
                            batch_size=args.samples)
    stats = LatentStats((0.0,) * cfg.vae.latent_channels, (1.0,) * cfg.vae.latent_channels)
    labels = np.arange(args.samples) % 2
    start = time.perf_counter()
    generate_images(vae, unet, sampling_scheduler(cfg.noise_schedule), stats, labels, np.arange(args.samples), sampler)
    results["ddim_sampling"] = {"images": args.samples, "steps": cfg.sample_steps,
                                "guidance_scale": cfg.guidance_scale,
                                "images_per_s": round(args.samples / (time.perf_counter() - start), 2)}
    results["params"] = {"vae": sum(p.numel() for p in vae.parameters()),
                         "unet": sum(p.numel() for p in unet.parameters())}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    mm = results["matmul_gflops"]
    print(f"matmul (best of 1024², 2048²): fp32 {mm['fp32']:.0f} GFLOP/s, bf16 {mm['bf16']:.0f} GFLOP/s  "
          f"({args.threads} threads, torch {torch.__version__})")
    print(f"params: VAE {results['params']['vae'] / 1e6:.2f} M, UNet {results['params']['unet'] / 1e6:.2f} M")
    print(f"{'step':<10}{'batch':>6}{'s/step':>9}{'img/s':>9}{'GFLOP':>8}{'GFLOP/s':>9}{'of matmul':>11}")
    for key in ("vae_fp32", "vae_bf16", "unet_fp32", "unet_bf16"):
        r = results[key]
        print(f"{key:<10}{r['batch']:>6}{r['seconds_per_step']:>9.3f}{r['images_per_s']:>9.1f}"
              f"{r['gflop_per_step']:>8.1f}{r['gflops']:>9.1f}{r['fraction_of_matmul']:>11.2f}")
    s = results["ddim_sampling"]
    print(f"DDIM sampling: {s['images_per_s']:.2f} images/s ({s['steps']} steps, guidance {s['guidance_scale']})")


if __name__ == "__main__":
    main()
