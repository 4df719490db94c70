"""A hospital's re-identification networks: local training rounds, evaluation on its own held-out patients.

The networks learn on the hospital's training patients; its held-out patients (who train nothing)
measure them. Half of every training batch is degraded (blur, and the global autoencoder's
reconstruction) so that a decoded or generated-looking chest is not "same patient" for looking so.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from diffusers import AutoencoderKL
from flwr.app import ConfigRecord

from clients.generative import local_vae
from clients.hospital import Hospital
from fl_unlearn.checkpoint import load_checkpoint, save_checkpoint
from fl_unlearn.models.reid import ReIDNetworks
from fl_unlearn.training.common import derived_seed
from fl_unlearn.training.reid import Precomputed, evaluate_reid, train_reid
from fl_unlearn.training.vae import reconstruct

State = dict[str, torch.Tensor]
CHECKPOINT = "reid.safetensors"


def _degrade(vae: AutoencoderKL, images: np.ndarray) -> Precomputed:
    """The global autoencoder's reconstruction of ``images``, computed once (it is fixed in this phase)."""
    return Precomputed(partial(reconstruct, vae), images)


def train_local(hospital: Hospital, state: State | None, *, steps: int, round_: int, vae: AutoencoderKL,
                start_step: int = 0, total_steps: int | None = None,
                optimizer_state: dict | None = None) -> tuple[ReIDNetworks, dict, dict]:
    """``steps`` local steps of both networks from ``state`` (None: fresh networks seeded per hospital).

    Returns the networks, the round's metrics and Adam's state for the next round.
    """
    cfg = hospital.config
    seed = derived_seed(cfg.seed, "reid", round_, hospital.index)
    torch.manual_seed(seed)
    nets = hospital.load(ReIDNetworks(cfg.reid), state)
    rows = hospital.split.train
    images = hospital.cohort.load_images(rows)
    stats = train_reid(nets, images, rows["patient"].to_numpy(), steps=steps,
                       batch_size=cfg.reid_batch_size, lr=cfg.reid_lr, seed=seed, degrade=_degrade(vae, images),
                       start_step=start_step, total_steps=total_steps, optimizer_state=optimizer_state)
    optimizer = stats.pop("optimizer_state")
    return nets, {"num-examples": len(rows), "loss": stats["retrieval_loss"] + stats["verification_loss"],
                  **stats}, optimizer


def reid_round(hospital: Hospital, state: State, config: ConfigRecord) -> tuple[State, dict]:
    """One FedAvg round: local steps of both networks from the global weights.

    The rounds follow one learning-rate cycle over all of them, and the hospital keeps Adam's moments
    from its previous round (in its work directory, never sent), as a centrally trained network would.
    Restarting the cycle and Adam every round made the averaged verifier drift: unseen patients'
    decoded images were called "same patient" more often than with the same steps trained centrally.
    """
    cfg = hospital.config
    rnd, local = int(config["round"]), cfg.reid_local_steps
    optimizer_state = hospital.optimizer_state("reid", rnd - 1)
    nets, metrics, optimizer = train_local(
        hospital, state, steps=local, round_=rnd, vae=local_vae(hospital), start_step=(rnd - 1) * local,
        total_steps=cfg.reid_rounds * local, optimizer_state=optimizer_state)
    hospital.keep_optimizer_state("reid", rnd, optimizer)
    return nets.state_dict(), {**metrics, "fresh-optimizer": int(rnd > 1 and optimizer_state is None)}


def keep_and_evaluate(hospital: Hospital, state: State | None) -> dict:
    """Store the networks this hospital audits with and measure them on its held-out patients.

    ``state`` is the final global model (federated), or None to train local-only networks here.
    """
    cfg = hospital.config
    vae = local_vae(hospital)
    if state is None:
        nets, _, _ = train_local(hospital, None, steps=cfg.reid_rounds * cfg.reid_local_steps, round_=0, vae=vae)
    else:
        nets = hospital.load(ReIDNetworks(cfg.reid), state)
    save_checkpoint(hospital.work_dir / CHECKPOINT, nets.state_dict(),
                    {"backbone": cfg.reid_backbone, "federated": cfg.reid_federated})
    (hospital.work_dir / "audit" / "control.json").unlink(missing_ok=True)  # measured with the old networks
    holdout = hospital.split.holdout
    images = hospital.cohort.load_images(holdout)
    result = evaluate_reid(nets.eval(), images, holdout["patient"].to_numpy(),
                           pairs=cfg.reid_eval_pairs, seed=derived_seed(cfg.seed, "reid-eval", hospital.index),
                           degrade=_degrade(vae, images))
    result.update({"holdout-patients": int(holdout["patient"].nunique()), "holdout-images": len(holdout)})
    return result


def load_networks(hospital: Hospital) -> ReIDNetworks:
    path = hospital.work_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{hospital.name} has no re-identification networks at {path}: "
                                f"the train-reid phase did not finish here")
    return hospital.load(ReIDNetworks(hospital.config.reid), load_checkpoint(path)[0]).eval()
