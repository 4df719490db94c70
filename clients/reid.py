"""A hospital's re-identification networks: local training rounds, evaluation on its own held-out patients.

The networks learn on the hospital's training patients; its held-out patients (who train nothing)
measure them. Half of every training batch is degraded (blur, and the global autoencoder's
reconstruction) so that a decoded or generated-looking chest is not "same patient" for looking so.
"""

from __future__ import annotations

from functools import partial

import torch
from flwr.app import ConfigRecord

from clients.generative import local_vae
from clients.hospital import Hospital
from fl_unlearn.checkpoint import load_checkpoint, save_checkpoint
from fl_unlearn.models.reid import ReIDNetworks
from fl_unlearn.training.common import derived_seed
from fl_unlearn.training.reid import evaluate_reid, train_reid
from fl_unlearn.training.vae import reconstruct

State = dict[str, torch.Tensor]
CHECKPOINT = "reid.safetensors"


def _degrade(hospital: Hospital):
    return partial(reconstruct, local_vae(hospital))


def train_local(hospital: Hospital, state: State | None, *, steps: int, round_: int,
                degrade) -> tuple[ReIDNetworks, dict]:
    """``steps`` local steps of both networks from ``state`` (None: fresh networks seeded per hospital)."""
    cfg = hospital.config
    seed = derived_seed(cfg.seed, "reid", round_, hospital.index)
    torch.manual_seed(seed)
    nets = ReIDNetworks(cfg.reid)
    if state is not None:
        nets.load_state_dict(state)
    rows = hospital.split.train
    stats = train_reid(nets, hospital.cohort.load_images(rows), rows["patient"].to_numpy(), steps=steps,
                       batch_size=cfg.reid_batch_size, lr=cfg.reid_lr, seed=seed, degrade=degrade)
    return nets, {"num-examples": len(rows), "loss": stats["retrieval_loss"] + stats["verification_loss"], **stats}


def reid_round(hospital: Hospital, state: State, config: ConfigRecord) -> tuple[State, dict]:
    """One FedAvg round: local steps of both networks from the global weights."""
    nets, metrics = train_local(hospital, state, steps=hospital.config.reid_local_steps, round_=int(config["round"]),
                                degrade=_degrade(hospital))
    return nets.state_dict(), metrics


def keep_and_evaluate(hospital: Hospital, state: State | None) -> dict:
    """Store the networks this hospital audits with and measure them on its held-out patients.

    ``state`` is the final global model (federated), or None to train local-only networks here.
    """
    cfg = hospital.config
    degrade = _degrade(hospital)
    if state is None:
        nets, _ = train_local(hospital, None, steps=cfg.reid_rounds * cfg.reid_local_steps, round_=0, degrade=degrade)
    else:
        nets = ReIDNetworks(cfg.reid)
        nets.load_state_dict(state)
    save_checkpoint(hospital.work_dir / CHECKPOINT, nets.state_dict(),
                    {"backbone": cfg.reid_backbone, "federated": cfg.reid_federated})
    (hospital.work_dir / "audit" / "control.json").unlink(missing_ok=True)  # measured with the old networks
    holdout = hospital.split.holdout
    result = evaluate_reid(nets.eval(), hospital.cohort.load_images(holdout), holdout["patient"].to_numpy(),
                           seed=derived_seed(cfg.seed, "reid-eval", hospital.index), degrade=degrade)
    result.update({"holdout-patients": int(holdout["patient"].nunique()), "holdout-images": len(holdout)})
    return result


def load_networks(hospital: Hospital) -> ReIDNetworks:
    path = hospital.work_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{hospital.name} has no re-identification networks at {path}: "
                                f"the train-reid phase did not finish here")
    nets = ReIDNetworks(hospital.config.reid)
    nets.load_state_dict(load_checkpoint(path)[0])
    return nets.eval()
