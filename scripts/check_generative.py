#!/usr/bin/env python3
"""Check a finished run's generative model against the gates of the generative issue, centrally.

This is an auditor's view of a *simulation* (it reads every hospital's images, which the federation
itself never does):
  1. conditioning: a classifier trained on real training images separates the synthetic images by
     their requested label (ROC AUC), next to its AUC on the real held-out test set;
  2. identity survives the autoencoder: a verification network trained on real images scores
     (image, VAE reconstruction) pairs of held-out patients against different-patient pairs (ROC AUC);
     on the phantom also the share of held-out studies whose granulomas and devices the autoencoder
     keeps (at least half of the mark's contrast; ``fl_unlearn.evaluation.marks``);
  3. memorization in pixel space: Carlini et al.'s nearest-neighbour ratio of each synthetic image
     against the LDM's training images;
and writes a reconstruction grid (real above, reconstructed below).

    python scripts/check_generative.py runs/cpu [--out docs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_unlearn.checkpoint import load_checkpoint
from fl_unlearn.config import RunConfig
from fl_unlearn.data.inspect import save_png
from fl_unlearn.data.sources import hospital_split, load_federation, phantom_config
from fl_unlearn.evaluation.marks import MARKS, mark_retention, shows_mark
from fl_unlearn.evaluation.metrics import auc_with_ci
from fl_unlearn.io import write_json_atomic
from fl_unlearn.models.classifier import build_classifier
from fl_unlearn.models.diffusion import build_vae
from fl_unlearn.privacy.memorization import nearest_neighbour_ratio
from fl_unlearn.training.classifier import ClassifierTrainConfig, predict, train_classifier
from fl_unlearn.training.vae import reconstruct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="folder for the reconstruction grid (default: <run>/checks)")
    parser.add_argument("--classifier-steps", type=int, default=400)
    parser.add_argument("--reid-steps", type=int, default=600)
    args = parser.parse_args()
    run_dir = Path(args.run_dir).resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = RunConfig.from_run_config({**manifest["run_config"], "resume-from": str(run_dir)})
    out = Path(args.out) if args.out else run_dir / "checks"
    torch.manual_seed(config.seed)

    cohort, plan = load_federation(config)
    splits = [hospital_split(config, plan.hospital_rows(cohort.table, i), i) for i in range(config.num_hospitals)]
    train_rows = pd.concat([s.train for s in splits])
    ldm_rows = pd.concat([s.ldm for s in splits])
    holdout_rows = pd.concat([s.holdout for s in splits])
    test_rows = plan.test_rows(cohort.table)
    synthetic = np.load(run_dir / "synthetic" / "original" / "images.npy")
    index = pd.read_csv(run_dir / "synthetic" / "original" / "index.csv")
    report: dict = {"run": str(run_dir), "synthetic_images": len(synthetic),
                    "ldm_training": {"patients": int(ldm_rows["patient"].nunique()), "images": len(ldm_rows)}}

    # 1. conditioning
    t0 = time.perf_counter()
    clf = build_classifier("small-cnn")
    train_classifier(clf, cohort.load_images(train_rows), train_rows["label"].to_numpy(),
                     ClassifierTrainConfig(steps=args.classifier_steps, seed=config.seed))
    report["classifier_real_test_auc"] = auc_with_ci(test_rows["label"], predict(clf, cohort.load_images(test_rows)))
    report["conditioning_auc"] = auc_with_ci(index["label"], predict(clf, synthetic))
    report["classifier_seconds"] = round(time.perf_counter() - t0, 1)

    # 2. identity through the autoencoder
    vae = build_vae(config.vae, config.image_size)
    vae.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "vae.safetensors")[0])
    held = cohort.load_images(holdout_rows)
    recon = reconstruct(vae, held)
    report["vae_mae_gray_levels"] = float(np.abs(recon.astype(float) - held).mean())
    report.update(identity_through_vae(config, cohort.load_images(train_rows), train_rows["patient"].to_numpy(),
                                       held, recon, holdout_rows["patient"].to_numpy(), args.reid_steps))
    if config.data_source == "phantom":
        report["vae_marks"] = {mark: mark_retention(partial(reconstruct, vae), holdout_rows, phantom_config(config), mark)
                               for mark in MARKS}
    shown = grid_studies(config, holdout_rows)
    save_png(np.concatenate([np.concatenate(list(held[shown]), 1), np.concatenate(list(recon[shown]), 1)], 0),
             out / "vae_reconstructions.png", scale=3)

    # 3. pixel-space memorization
    ldm_images = cohort.load_images(ldm_rows)
    mem = nearest_neighbour_ratio(synthetic, ldm_images)
    matched = ldm_rows["patient"].to_numpy()[mem["nearest"][mem["flagged"]]]
    report["pixel_memorization"] = {"flagged_images": int(mem["flagged"].sum()),
                                    "share": round(float(mem["flagged"].mean()), 4),
                                    "distinct_patients": len(set(matched)),
                                    "median_ratio": round(float(np.median(mem["ratio"])), 3)}
    write_json_atomic(out / "generative_checks.json", report)
    print(json.dumps(report, indent=2))


def grid_studies(config: RunConfig, rows: pd.DataFrame, n: int = 8) -> np.ndarray:
    """Positions of up to ``n`` studies for the reconstruction grid: on the phantom, one study of each
    patient with a device, then of each with granulomas, then the rest, so the grid shows the small marks."""
    if config.data_source != "phantom":
        return np.arange(min(n, len(rows)))
    phantom = phantom_config(config)
    patients = rows["patient"].to_numpy()
    studies = list(zip(patients, rows["visit"], strict=True))
    granulomas, device = (np.array([shows_mark(phantom, int(p.lstrip("P")), int(v), mark) for p, v in studies])
                          for mark in ("granulomas", "device"))
    chosen: list[int] = []
    for wanted in (device, granulomas & ~device, np.ones(len(rows), dtype=bool)):
        shown = {patients[i] for i in chosen}
        for i in np.flatnonzero(wanted):
            if len(chosen) < n and patients[i] not in shown:
                chosen.append(int(i))
                shown.add(patients[i])
    return np.array(chosen)


def identity_through_vae(config: RunConfig, train_images, train_patients, held, recon, held_patients,
                         steps: int) -> dict:
    """Verification AUC of (image, its reconstruction) vs different-patient pairs, held-out patients."""
    from fl_unlearn.models.reid import ReIDConfig, VerificationNet
    from fl_unlearn.training.reid import train_verification, verify

    net = VerificationNet(ReIDConfig(backbone="small-cnn", input_size=config.image_size))
    # Trained on sharp real images only: the check is whether identity survives, not whether a
    # network can be taught to accept reconstructions.
    train_verification(net, train_images, train_patients, steps=steps, seed=config.seed)
    rng = np.random.default_rng(config.seed)
    same = verify(net, held, recon)
    other = rng.permutation(len(held))
    keep = held_patients[other] != held_patients
    different = verify(net, recon[keep], held[other][keep])
    labels = np.r_[np.ones(len(same)), np.zeros(len(different))]
    return {"vae_identity_auc": auc_with_ci(labels, np.r_[same, different]),
            "vae_identity_pairs": {"same": len(same), "different": len(different)}}


if __name__ == "__main__":
    main()
