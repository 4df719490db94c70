"""A hospital's side of unlearning: local rounds of the chosen method on its own forget and remain latents.

The forget set comes from this hospital's audit (and deletion requests), kept in its work directory;
the latents are the ones cached in the encode phase. A hospital without forget patients trains on its
remain set only, which keeps the model's utility anchored to the data everybody still consents to.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord

from clients.audit import read_forget_set
from clients.generative import load_latent_cache
from clients.hospital import Hospital
from fl_unlearn.checkpoint import load_checkpoint, save_checkpoint
from fl_unlearn.models.diffusion import build_unet, train_scheduler
from fl_unlearn.pipeline import LatentStats
from fl_unlearn.training.common import derived_seed
from fl_unlearn.training.ldm import LDMTrainConfig, train_ldm
from fl_unlearn.unlearning import saliency_scores, unlearn

State = dict[str, torch.Tensor]


def forget_mask(hospital: Hospital, forget_set: str) -> np.ndarray:
    """Which cached LDM latents belong to ``forget_set`` (the cache follows ``split.ldm``'s row order)."""
    chosen = read_forget_set(hospital, forget_set)
    patients = set(chosen["linked"]) | set(chosen["requested"])
    return hospital.split.ldm["patient"].astype(str).isin(patients).to_numpy()


def _latents(hospital: Hospital, config: ConfigRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    latents, labels = load_latent_cache(hospital)
    stats = LatentStats(tuple(config["latent-mean"]), tuple(config["latent-std"]))
    mask = forget_mask(hospital, str(config["forget-set"]))
    if len(mask) != len(latents):
        raise RuntimeError(f"{hospital.name}: {len(latents)} cached latents but {len(mask)} LDM rows; re-run encode")
    return stats.normalize(latents).numpy(), labels, mask


def _unet(hospital: Hospital, state: State):
    cfg = hospital.config
    return hospital.load(build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels), state)


def saliency(hospital: Hospital, theta0: State, config: ConfigRecord) -> State | None:
    """SalUn's summed, clipped, signed forget-loss gradients at θ0 (None without forget patients)."""
    z, y, mask = _latents(hospital, config)
    if not mask.any():
        return None
    cfg = hospital.config
    scores = saliency_scores(_unet(hospital, theta0), train_scheduler(cfg.noise_schedule), (z[mask], y[mask]),
                             batch_size=cfg.unlearn_batch_size, seed=derived_seed(cfg.seed, "saliency", hospital.index))
    return scores


def unlearn_round(hospital: Hospital, state: State, config: ConfigRecord,
                  mask: dict[str, torch.Tensor] | None) -> tuple[State, dict]:
    """One federated round of ``config['method']`` from the global model ``state``."""
    cfg = hospital.config
    method, rnd = str(config["method"]), int(config["round"])
    z, y, in_forget = _latents(hospital, config)
    seed = derived_seed(cfg.seed, "unlearn", method, rnd, hospital.index)
    scheduler = train_scheduler(cfg.noise_schedule)
    if method == "retrain":  # exact unlearning: the LDM's own loop, from scratch, on D_r only
        unet = _unet(hospital, state)
        result = train_ldm(unet, scheduler, z[~in_forget], y[~in_forget], LDMTrainConfig(
            steps=cfg.ldm_local_steps, batch_size=cfg.ldm_batch_size, lr=cfg.ldm_lr, loss=cfg.ldm_loss,
            label_dropout=cfg.ldm_label_dropout, bf16=cfg.bf16, seed=seed))
        return unet.state_dict(), {"num-examples": int((~in_forget).sum()), "loss": result["loss"],
                                   "seconds": result["seconds"], "steps": cfg.ldm_local_steps}
    original = hospital.work_dir / "theta0.safetensors"
    if int(config["cycle-round"]) == 1:  # every cycle starts from its θ0: keep it for KL-Away's frozen copy
        save_checkpoint(original, state, {"source": "global LDM before this unlearning cycle",
                                          "method": method, "cycle": int(config["cycle"])})
    if not original.is_file():
        raise FileNotFoundError(f"{hospital.name} has no θ0 at {original}: unlearning must start at round 1")
    theta0 = _unet(hospital, load_checkpoint(original)[0])
    unet = _unet(hospital, state)
    forget = (z[in_forget], y[in_forget]) if in_forget.any() else None
    stats = unlearn(unet, theta0, scheduler, method, forget, (z[~in_forget], y[~in_forget]), cfg.unlearning,
                    mask=mask, seed=seed)
    # The same keys at every hospital (Flower aggregates only consistent MetricRecords): 0 where a term is absent.
    forget_term = stats.get("divergence", stats.get("forget", 0.0))
    return unet.state_dict(), {"num-examples": len(z), "loss": stats.get("remain", 0.0), "forget-term": forget_term,
                               "seconds": stats["seconds"], "steps": cfg.unlearn_local_steps,
                               "forget-latents": int(in_forget.sum())}
