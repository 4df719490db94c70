"""A hospital's side of the generative phases: local autoencoder and LDM rounds, and its latent cache."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord

from clients.hospital import Hospital
from fl_unlearn.checkpoint import load_checkpoint, save_checkpoint
from fl_unlearn.io import atomic_path
from fl_unlearn.models.diffusion import build_unet, build_vae, train_scheduler
from fl_unlearn.pipeline import LatentStats
from fl_unlearn.training.common import derived_seed
from fl_unlearn.training.ldm import LDMTrainConfig, train_ldm
from fl_unlearn.training.vae import VAETrainConfig, encode_latents, train_vae

State = dict[str, torch.Tensor]


def vae_round(hospital: Hospital, state: State, config: ConfigRecord) -> tuple[State, dict]:
    """Local autoencoder steps on all of this hospital's training images (not the holdout patients).

    With ``vae-lr-schedule = "one-cycle"`` the rounds follow one learning-rate cycle and the hospital
    keeps AdamW's moments from its previous round (in its work directory, never sent), as for the LDM.
    """
    cfg = hospital.config
    rnd, local = int(config["round"]), cfg.vae_local_steps
    cycle = cfg.vae_lr_schedule == "one-cycle"
    vae = hospital.load(build_vae(cfg.vae, cfg.image_size), state)
    images = hospital.cohort.load_images(hospital.split.train)
    optimizer_state = hospital.optimizer_state("vae", rnd - 1) if cycle else None
    stats = train_vae(vae, images, VAETrainConfig(
        steps=local, batch_size=cfg.vae_batch_size, lr=cfg.vae_lr, kl_weight=cfg.vae_kl_weight,
        ssim_weight=cfg.vae_ssim_weight, hard_pixel_weight=cfg.vae_hard_pixel_weight, bf16=cfg.bf16,
        seed=derived_seed(cfg.seed, "vae", rnd, hospital.index),
        start_step=(rnd - 1) * local, total_steps=cfg.vae_rounds * local if cycle else None),
        optimizer_state=optimizer_state)
    if cycle:
        hospital.keep_optimizer_state("vae", rnd, stats["optimizer_state"])
    return vae.state_dict(), {"num-examples": len(images), "loss": stats["loss"], "rec": stats["rec"],
                              "seconds": stats["seconds"], "fresh-optimizer": int(cycle and rnd > 1 and optimizer_state is None)}


def encode_cache(hospital: Hospital, vae_state: State) -> tuple[int, dict]:
    """Encode the LDM images once with the global autoencoder into the hospital's own work directory."""
    cfg = hospital.config
    vae = hospital.load(build_vae(cfg.vae, cfg.image_size), vae_state)
    rows = hospital.split.ldm
    latents = encode_latents(vae, hospital.cohort.load_images(rows))
    # Kept locally: re-identification training and the audit's false-positive control decode with it.
    save_checkpoint(hospital.work_dir / "vae.safetensors", vae_state, {"source": "global autoencoder"})
    with atomic_path(hospital.work_dir / "ldm_latents.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, latents=latents, labels=rows["label"].to_numpy())
    return len(latents), LatentStats.moments(latents)


def local_vae(hospital: Hospital):
    """The global autoencoder as this hospital received it in the encode phase."""
    path = hospital.work_dir / "vae.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{hospital.name} has no autoencoder at {path}: the encode phase did not run here")
    return hospital.load(build_vae(hospital.config.vae, hospital.config.image_size), load_checkpoint(path)[0]).eval()


def load_latent_cache(hospital: Hospital) -> tuple[np.ndarray, np.ndarray]:
    path = hospital.work_dir / "ldm_latents.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{hospital.name} has no latent cache at {path}: the encode phase did not run here")
    with np.load(path) as data:
        return data["latents"], data["labels"]


def ldm_round(hospital: Hospital, state: State, config: ConfigRecord) -> tuple[State, dict]:
    """Local ε-prediction steps on this hospital's cached, standardised latents.

    The hospital keeps its AdamW moments from one round to the next (in its work directory, never
    sent): restarting Adam every round kicks each weight by about one learning rate and, measured on
    the cpu preset, roughly halved what the federated model learnt of its training images.
    """
    cfg = hospital.config
    rnd = int(config["round"])
    latents, labels = load_latent_cache(hospital)
    stats = LatentStats(tuple(config["latent-mean"]), tuple(config["latent-std"]))
    unet = hospital.load(build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels), state)
    optimizer_state = hospital.optimizer_state("ldm", rnd - 1)
    result = train_ldm(unet, train_scheduler(cfg.noise_schedule), stats.normalize(latents).numpy(), labels,
                       LDMTrainConfig(steps=cfg.ldm_local_steps, batch_size=cfg.ldm_batch_size, lr=cfg.ldm_lr,
                                      loss=cfg.ldm_loss, label_dropout=cfg.ldm_label_dropout, bf16=cfg.bf16,
                                      seed=derived_seed(cfg.seed, "ldm", rnd, hospital.index)),
                       optimizer_state=optimizer_state)
    hospital.keep_optimizer_state("ldm", rnd, result["optimizer_state"])
    return unet.state_dict(), {"num-examples": len(latents), "loss": result["loss"], "seconds": result["seconds"],
                               "fresh-optimizer": int(rnd > 1 and optimizer_state is None)}
