"""Phases of the generative model: federated autoencoder, latent caching, federated LDM, synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fl_unlearn.checkpoint import load_checkpoint, save_checkpoint
from fl_unlearn.data.inspect import save_png, tile_rows
from fl_unlearn.io import atomic_path, write_json_atomic, write_text_atomic
from fl_unlearn.models.diffusion import build_unet, build_vae, sampling_scheduler
from fl_unlearn.pipeline import LatentStats, SamplerConfig, generate_images, image_seeds
from fl_unlearn.runs import RunDirectory
from server.federation import Federation
from server.rounds import fedavg_rounds


def _init_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_vae(federation: Federation, run: RunDirectory) -> dict:
    """FedAvg rounds of the autoencoder over every hospital's training images."""
    cfg = run.config
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg.vae, cfg.image_size)
    fedavg_rounds(federation, run, phase="train-vae", rounds=cfg.vae_rounds, initial=_init_state(vae),
                  checkpoint=run.file("checkpoints", "vae.safetensors"), config={},
                  meta={"vae": cfg.vae_channels, "latent_channels": cfg.vae_latent_channels,
                        "image_size": cfg.image_size})
    return {"rounds": cfg.vae_rounds}


def encode(federation: Federation, run: RunDirectory) -> dict:
    """Each hospital encodes its LDM images once (posterior mean) into its own cache; the server pools moments."""
    vae_state, _ = load_checkpoint(run.file("checkpoints", "vae.safetensors"))
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=vae_state), "config": ConfigRecord({})})
    ok = federation.usable(federation.send_to_hospitals("query.encode", content), "encode")
    moments = [dict(m.content["moments"]) for _, m in sorted(ok.items())]
    stats = LatentStats.from_moments(moments)
    write_json_atomic(run.file("checkpoints", "latent_stats.json"), {"mean": stats.mean, "std": stats.std})
    counts = {f"hospital-{h}": int(m.content["metrics"]["num-examples"]) for h, m in sorted(ok.items())}
    print(f"[fl-unlearn] encode: latents per hospital {counts}; channel std {np.round(stats.std, 3).tolist()}",
          flush=True)
    return {"latents": counts}


def load_latent_stats(run: RunDirectory) -> LatentStats:
    raw = json.loads(run.file("checkpoints", "latent_stats.json").read_text())
    return LatentStats(tuple(raw["mean"]), tuple(raw["std"]))


def train_ldm(federation: Federation, run: RunDirectory) -> dict:
    """FedAvg rounds of the class-conditional UNet on the hospitals' cached latents (optional server EMA)."""
    cfg = run.config
    torch.manual_seed(cfg.seed + 1)
    unet = build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels)
    stats = load_latent_stats(run)
    result = fedavg_rounds(
        federation, run, phase="train-ldm", rounds=cfg.ldm_rounds, initial=_init_state(unet),
        checkpoint=run.file("checkpoints", "unet-train.safetensors"),
        config={"latent-mean": list(stats.mean), "latent-std": list(stats.std)}, ema_decay=cfg.ldm_ema,
    )
    # θ0, the model that is audited and unlearned: the EMA when enabled, else the last global model.
    theta0 = result["ema"] if result["ema"] is not None else result["global"]
    save_checkpoint(run.file("checkpoints", "unet.safetensors"), theta0,
                    {"phase": "train-ldm", "rounds": cfg.ldm_rounds, "ema": cfg.ldm_ema,
                     "unet": cfg.unet_channels, "latent_size": cfg.latent_size})
    return {"rounds": cfg.ldm_rounds, "parameters": sum(v.numel() for v in theta0.values())}


def load_vae(run: RunDirectory):
    """The run's global autoencoder, in eval mode."""
    vae = build_vae(run.config.vae, run.config.image_size)
    vae.load_state_dict(load_checkpoint(run.file("checkpoints", "vae.safetensors"))[0])
    return vae.to(run.config.torch_device).eval()


def load_generator(run: RunDirectory, unet_checkpoint: str = "unet.safetensors"):
    """(vae, unet, latent stats) of a run, in eval mode."""
    cfg = run.config
    vae = load_vae(run)
    unet = build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels)
    unet.load_state_dict(load_checkpoint(run.file("checkpoints", unet_checkpoint))[0])
    return vae, unet.to(cfg.torch_device).eval(), load_latent_stats(run)


def sampler_config(cfg) -> SamplerConfig:
    """The run's DDIM settings: the original set and every regenerated one use the same."""
    return SamplerConfig(steps=cfg.sample_steps, eta=cfg.sample_eta, guidance_scale=cfg.guidance_scale,
                         batch_size=cfg.sample_batch_size, bf16=cfg.sample_bf16)


def synthetic_labels(count: int) -> np.ndarray:
    """Balanced by class: half negative, half positive (the paper's 4,000 = 2,000 + 2,000)."""
    return (np.arange(count) >= count // 2).astype(np.int64)


def generate(federation: Federation, run: RunDirectory) -> dict:
    """The server samples the synthetic set from θ0, one recorded seed per image, and saves a sample grid."""
    cfg = run.config
    vae, unet, stats = load_generator(run)
    labels = synthetic_labels(cfg.num_synthetic)
    seeds = image_seeds(cfg.seed, cfg.num_synthetic)
    sampler = sampler_config(cfg)
    images = generate_images(vae, unet, sampling_scheduler(cfg.noise_schedule), stats, labels, seeds, sampler)
    save_synthetic_set(run, "original", images, labels, seeds, sampler)
    return {"images": len(images), "positives": int(labels.sum())}


def save_synthetic_set(run: RunDirectory, name: str, images: np.ndarray, labels: np.ndarray, seeds: np.ndarray,
                       sampler: SamplerConfig) -> None:
    """``synthetic/<name>/``: images.npy, index.csv (index, label, seed), sampler.json, grid.png."""
    folder = run.file("synthetic", name)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "images.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, images, allow_pickle=False)
    index = pd.DataFrame({"index": np.arange(len(images)), "label": labels, "seed": seeds})
    write_text_atomic(folder / "index.csv", index.to_csv(index=False))
    write_json_atomic(folder / "sampler.json", {"steps": sampler.steps, "eta": sampler.eta,
                                                "guidance_scale": sampler.guidance_scale, "scheduler": "DDIM",
                                                "bf16": sampler.bf16})
    save_png(sample_grid(images, labels), folder / "grid.png", scale=2)


def load_synthetic_set(run: RunDirectory, name: str) -> tuple[np.ndarray, pd.DataFrame]:
    folder = run.file("synthetic", name)
    if not (folder / "images.npy").is_file():
        raise FileNotFoundError(f"no synthetic set {name!r} at {folder}: the generate phase did not run")
    return np.load(folder / "images.npy"), pd.read_csv(folder / "index.csv")


def sample_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 8, pad: int = 2) -> np.ndarray:
    """One row per class (top: no cardiomegaly, bottom: cardiomegaly), ``per_class`` images each."""
    return tile_rows([images[labels == label][:per_class] for label in (0, 1)], pad)
