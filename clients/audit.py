"""A hospital's audit of a synthetic set against the real images the generative model was trained on.

What leaves the hospital: per synthetic image the rank-1 score and the flag, for flagged images a
salted token of the matched patient, and counts. What stays in its work directory: the matched
patients, the forget/remain sets, the token secret, a PNG of flagged pairs for its own staff.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial

import numpy as np
import pandas as pd

from clients.generative import local_vae
from clients.hospital import Hospital
from clients.reid import load_networks
from fl_unlearn.data.inspect import save_png
from fl_unlearn.io import write_json_atomic, write_text_atomic
from fl_unlearn.privacy.audit import (
    FalsePositiveControl,
    audit,
    check_requested,
    false_positive_control,
    forget_remain,
    load_or_create_secret,
    pairs_grid,
    patient_token,
    read_deletion_requests,
)
from fl_unlearn.privacy.entanglement import entanglement_score
from fl_unlearn.privacy.memorization import nearest_neighbour_ratio
from fl_unlearn.privacy.metrics import linked_patients, summary
from fl_unlearn.training.common import derived_seed
from fl_unlearn.training.reid import embed
from fl_unlearn.training.vae import reconstruct

#: The synthetic set whose audit defines the forget set P_f (later sets are re-audits after unlearning).
ORIGINAL = "original"


def _control(hospital: Hospital, nets, reference: np.ndarray, reference_embeddings: np.ndarray) -> FalsePositiveControl:
    """The false-positive control (and calibrated threshold), measured once per hospital and reused by re-audits."""
    path = hospital.work_dir / "audit" / "control.json"
    if path.is_file():
        return FalsePositiveControl(**json.loads(path.read_text()))
    cfg = hospital.config
    holdout = hospital.split.holdout
    control = false_positive_control(
        nets.retrieval, nets.verification, hospital.cohort.load_images(holdout),
        holdout["patient"].astype(str).to_numpy(), reference, reference_embeddings, cfg.audit,
        degrade=partial(reconstruct, local_vae(hospital)), seed=derived_seed(cfg.seed, "calibrate", hospital.index))
    write_json_atomic(path, asdict(control))
    return control


def forget_patients_path(hospital: Hospital, forget_set: str):
    """Where this hospital keeps a forget set: the original audit's, or one a method's closed loop grew."""
    name = "forget-patients.json" if forget_set == ORIGINAL else f"forget-patients-{forget_set}.json"
    return hospital.work_dir / name


def read_forget_set(hospital: Hospital, forget_set: str) -> dict:
    path = forget_patients_path(hospital, forget_set)
    if not path.is_file():
        raise FileNotFoundError(f"{hospital.name} has no forget set {forget_set!r} at {path}: "
                                f"the audit that makes it did not run here")
    return json.loads(path.read_text())


def audit_synthetic(hospital: Hospital, synthetic: np.ndarray, set_name: str,
                    grow: dict | None = None) -> tuple[dict, dict[str, list[str]], dict]:
    """Audit ``synthetic`` here. Returns (arrays to send, salted tokens, metrics).

    Tokens: ``matched`` (per image, "" where not flagged), and when a forget set is made or grown,
    ``forget`` (its patients) and ``requested`` (those of them who asked to be forgotten).

    The audit of the original set makes the forget set; ``grow`` (``{"forget-set": name, "grow-from":
    set}``) adds the patients this audit links to forget set ``grow-from`` and keeps it as ``name``.
    """
    cfg = hospital.config
    rows = hospital.split.ldm  # the generative model's training images: who can be memorized
    requested: list[str] = []
    if set_name == ORIGINAL and cfg.deletion_requests:  # checked before anything is computed or written
        requested = check_requested(read_deletion_requests(cfg.deletion_requests, hospital.name),
                                    hospital.rows["patient"].astype(str))
    nets = load_networks(hospital)
    reference = hospital.cohort.load_images(rows)
    patients = rows["patient"].astype(str).to_numpy()
    reference_embeddings = embed(nets.retrieval, reference)
    control = _control(hospital, nets, reference, reference_embeddings)
    result = audit(nets.retrieval, nets.verification, synthetic, reference, threshold=control.threshold,
                   top_k=cfg.audit_top_k, reference_embeddings=reference_embeddings)
    matched = patients[result.rank1]
    linked = sorted(linked_patients(matched, result.flags))
    secret = load_or_create_secret(hospital.work_dir / "token-secret.bin")
    tokens = [patient_token(secret, p) if flag else "" for p, flag in zip(matched, result.flags, strict=True)]

    folder = hospital.work_dir / "audit"
    local = pd.DataFrame({"index": np.arange(len(synthetic)), "score": result.scores, "flagged": result.flags,
                          "patient": matched, "distance": result.distances[:, 0]})
    write_text_atomic(folder / f"{set_name}.csv", local.to_csv(index=False))
    if result.flags.any():
        flagged = np.flatnonzero(result.flags)
        save_png(pairs_grid(synthetic[flagged], reference[result.rank1[flagged]], result.scores[flagged]),
                 folder / f"{set_name}-flagged-pairs.png", scale=2)

    # A second, network-free detector: Carlini et al.'s pixel-space near-copies of this hospital's images.
    copies = nearest_neighbour_ratio(synthetic, reference)["flagged"]
    metrics = {**summary(len(synthetic), result.flags, linked), "threshold": control.threshold,
               "pixel-copies": int(copies.sum()), "pixel-copies-flagged": int((copies & result.flags).sum()),
               "threshold-calibrated": int(control.calibrated), "control-rate": control.rate,
               "control-images": control.images, "reference-images": len(rows),
               "reference-patients": int(rows["patient"].nunique()), "num-examples": len(synthetic)}
    forget_tokens: list[str] = []
    requested_tokens: list[str] = []
    if set_name == ORIGINAL or grow:
        forget_set, forget_linked = ORIGINAL if set_name == ORIGINAL else str(grow["forget-set"]), linked
        if forget_set != ORIGINAL:
            base = read_forget_set(hospital, str(grow["grow-from"]))
            forget_linked, requested = sorted(set(base["linked"]) | set(linked)), base["requested"]
        split = forget_remain(rows, forget_linked, requested, known=hospital.rows["patient"].astype(str))
        suffix = "" if forget_set == ORIGINAL else f"-{forget_set}"
        write_text_atomic(hospital.work_dir / f"forget{suffix}.csv", split.forget.to_csv(index=False))
        write_text_atomic(hospital.work_dir / f"remain{suffix}.csv", split.remain.to_csv(index=False))
        write_json_atomic(forget_patients_path(hospital, forget_set),
                          {"linked": split.linked, "requested": split.requested})
        forget_tokens = sorted(patient_token(secret, p) for p in split.patients)
        requested_tokens = sorted(patient_token(secret, p) for p in split.requested)
        metrics.update({"forget-patients": len(split.patients), "forget-images": len(split.forget),
                        "remain-images": len(split.remain), "requested-patients": len(split.requested)})
        if len(split.forget) and len(split.remain):
            in_forget = rows["patient"].astype(str).isin(split.patients).to_numpy()
            es = entanglement_score(reference_embeddings[in_forget], reference_embeddings[~in_forget])
            metrics.update({"entanglement-es": es["es"], "entanglement-percent": es["percent"]})
    arrays = {"scores": result.scores.astype(np.float32), "flags": result.flags.astype(np.uint8)}
    return arrays, {"matched": tokens, "forget": forget_tokens, "requested": requested_tokens}, metrics
