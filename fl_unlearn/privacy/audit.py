"""The re-identification audit of synthetic images at one hospital, and the forget/remain sets it implies.

Following the paper (and Packhäuser et al.'s MIMIC replication): the retrieval network proposes the
``top_k`` nearest real training images of every synthetic image (one batched search over unit
embeddings, Euclidean distance, the convention the retrieval network was trained with); the
verification network scores the rank-1 pair; the image is non-anonymous when that score is >= the
threshold. A flagged image links the rank-1 image's patient.

Everything here runs inside a hospital. What may leave it is decided by the caller (``clients/``):
scores, flags and salted patient tokens, never pixels, ids or paths.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fl_unlearn.data.inspect import tile_rows
from fl_unlearn.errors import ConfigError, DataError
from fl_unlearn.io import write_bytes_atomic
from fl_unlearn.models.reid import RetrievalNet, VerificationNet
from fl_unlearn.training.reid import Degrade, calibrate_threshold, embed, verify


@dataclass(frozen=True)
class AuditConfig:
    """``threshold`` is the paper's 0.5; ``target_fpr`` > 0 replaces it by one calibrated on unseen patients."""

    threshold: float = 0.5
    top_k: int = 3
    target_fpr: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"audit threshold must be in (0, 1], got {self.threshold}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"audit top-k must be an integer >= 1, got {self.top_k!r}")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ConfigError(f"audit target false-positive rate must be in [0, 1), got {self.target_fpr}")


@dataclass
class AuditResult:
    """Per synthetic image: the rank-1 verification score, the flag, and the retrieved reference indices."""

    scores: np.ndarray  # float32 [N]
    flags: np.ndarray  # bool [N]: scores >= threshold
    neighbours: np.ndarray  # int64 [N, k]: indices into the reference images, nearest first
    distances: np.ndarray  # float32 [N, k]
    threshold: float

    @property
    def rank1(self) -> np.ndarray:
        return self.neighbours[:, 0]

    @property
    def flag_rate(self) -> float:
        return float(self.flags.mean()) if len(self.flags) else 0.0


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, k: int,
                       batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean top-``k`` of every query row among the reference rows: (distances, indices), nearest first.

    One matrix product + ``topk`` per block of queries, on ‖r‖² − 2q·r (the squared distance less the
    row's constant ‖q‖²: the same order, and no square root over the whole block); only the k kept
    distances are completed and rooted. At 4,000 × 100,000 × 128 this is 18% faster than ``cdist``
    with the same indices and distances. Ties go to the lower reference index.
    """
    if reference.ndim != 2 or queries.ndim != 2 or queries.shape[1] != reference.shape[1]:
        raise DataError(f"nearest-neighbour search needs [N,D] queries and [M,D] references, got "
                        f"{queries.shape} and {reference.shape}")
    if not len(reference):
        raise DataError("the reference set of real images is empty: nothing to audit against")
    k = min(k, len(reference))
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    ref_sq = (ref * ref).sum(1)
    dists, idx = [], []
    for start in range(0, len(queries), batch_size):
        q = torch.from_numpy(np.ascontiguousarray(queries[start: start + batch_size], dtype=np.float32))
        top = torch.addmm(ref_sq, q, ref.T, alpha=-2.0).topk(k, dim=1, largest=False, sorted=True)
        dists.append((top.values + (q * q).sum(1, keepdim=True)).clamp_min(0).sqrt().numpy())
        idx.append(top.indices.numpy())
    if not dists:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate(dists), np.concatenate(idx).astype(np.int64)


def audit(retrieval: RetrievalNet, verification: VerificationNet, synthetic: np.ndarray, reference: np.ndarray,
          *, threshold: float = 0.5, top_k: int = 3, reference_embeddings: np.ndarray | None = None) -> AuditResult:
    """Audit uint8 ``synthetic`` images [N,H,W] against the real ``reference`` images [M,H,W].

    Pass ``reference_embeddings`` (``embed(retrieval, reference)``) to embed the real images once for
    several audits.
    """
    if synthetic.ndim != 3 or reference.ndim != 3 or synthetic.shape[1:] != reference.shape[1:]:
        raise DataError(f"the synthetic images {synthetic.shape} and the real images {reference.shape} must both be "
                        f"[N,H,W] of one size")
    if reference_embeddings is None:
        reference_embeddings = embed(retrieval, reference)
    distances, neighbours = nearest_neighbours(embed(retrieval, synthetic), reference_embeddings, top_k)
    scores = verify(verification, synthetic, reference[neighbours[:, 0]]) if len(synthetic) else np.empty(0, np.float32)
    return AuditResult(scores=scores, flags=scores >= threshold, neighbours=neighbours, distances=distances,
                       threshold=float(threshold))


@dataclass
class FalsePositiveControl:
    """Unseen patients' images through the autoencoder, audited like synthetic images: how often flagged."""

    threshold: float
    calibrated: bool
    rate: float  # share of control images flagged at ``threshold``
    images: int
    calibration_images: int


def false_positive_control(retrieval: RetrievalNet, verification: VerificationNet,
                           unseen: np.ndarray, unseen_patients: np.ndarray, reference: np.ndarray,
                           reference_embeddings: np.ndarray, config: AuditConfig, *,
                           degrade: Degrade | None, seed: int = 0) -> FalsePositiveControl:
    """The control that matters for synthetic images, and the calibrated threshold when one is asked for.

    ``unseen`` are real images of patients who trained nothing; ``degrade`` (encode and decode with the
    global VAE) makes them look generated. With ``config.target_fpr`` > 0, half of the unseen patients
    calibrate the threshold and the other half measure the rate, so the rate is not measured on the
    images that set the threshold.
    """
    if not len(unseen):
        raise DataError("the false-positive control needs images of unseen (held-out) patients; the holdout is empty")
    images = np.asarray(degrade(unseen)) if degrade is not None else unseen
    patients = np.asarray(unseen_patients)
    threshold, calibrated, control = config.threshold, False, np.ones(len(images), dtype=bool)
    if config.target_fpr > 0:
        ids = np.unique(patients)
        if len(ids) < 2:
            raise DataError("calibrating the audit threshold needs at least 2 held-out patients")
        calibration_ids = np.random.default_rng(seed).permutation(ids)[: len(ids) // 2]
        control = ~np.isin(patients, calibration_ids)
        scores = audit(retrieval, verification, images[~control], reference, threshold=1.0, top_k=1,
                       reference_embeddings=reference_embeddings).scores
        threshold, calibrated = min(calibrate_threshold(scores, config.target_fpr), 1.0), True
    result = audit(retrieval, verification, images[control], reference, threshold=threshold, top_k=1,
                   reference_embeddings=reference_embeddings)
    return FalsePositiveControl(threshold=float(threshold), calibrated=calibrated, rate=result.flag_rate,
                                images=int(control.sum()), calibration_images=int((~control).sum()))


# ---------------------------------------------------------------------------- salted patient tokens


def load_or_create_secret(path: str | Path) -> bytes:
    """The hospital's HMAC key: 32 random bytes created once in its work directory (mode 0600), never sent."""
    path = Path(path)
    if path.is_file():
        secret = path.read_bytes()
        if len(secret) < 16:
            raise DataError(f"the token secret at {path} is {len(secret)} bytes long; expected 32 (delete it to "
                            f"create a new one, which changes every token)")
        return secret
    secret = secrets.token_bytes(32)
    write_bytes_atomic(path, secret)
    os.chmod(path, 0o600)
    return secret


def patient_token(secret: bytes, patient: object) -> str:
    """HMAC-SHA256 of the patient id under the hospital's secret (16 hex digits): stable, not invertible."""
    return hmac.new(secret, str(patient).encode("utf-8"), hashlib.sha256).hexdigest()[:16]


# ---------------------------------------------------------------------------- forget / remain sets


def read_deletion_requests(path: str | Path, hospital: str) -> list[str]:
    """Patient ids that asked to be forgotten at ``hospital``, from a CSV with columns ``patient`` [, ``hospital``].

    Without a ``hospital`` column every row is a request to this hospital (a hospital's own file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"deletion requests file {path} does not exist")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "patient" not in table.columns:
        raise DataError(f"deletion requests file {path} has no 'patient' column (columns: {list(table.columns)})")
    if "hospital" in table.columns:
        table = table[table["hospital"].str.strip() == hospital]
    patients = [p.strip() for p in table["patient"]]
    if any(not p for p in patients):
        raise DataError(f"deletion requests file {path} has an empty patient id")
    return sorted(set(patients))


@dataclass
class ForgetSplit:
    """D_f (all training images of the forget patients) and D_r (the rest), as row tables of one hospital."""

    forget: pd.DataFrame
    remain: pd.DataFrame
    linked: list[str]  # patients found by the audit
    requested: list[str]  # patients who asked to be forgotten

    @property
    def patients(self) -> list[str]:
        return sorted(set(self.linked) | set(self.requested))


def check_requested(requested: Iterable, known: Collection) -> list[str]:
    """The requested patient ids as sorted strings; one that is not in ``known`` is an error naming it."""
    known_ids = {str(p) for p in known}
    requested_ids = sorted({str(p) for p in requested})
    unknown = [p for p in requested_ids if p not in known_ids]
    if unknown:
        raise DataError(f"deletion request names patient(s) this hospital does not hold: {', '.join(unknown)}")
    return requested_ids


def forget_remain(training_rows: pd.DataFrame, linked: Iterable, requested: Iterable = (),
                  known: Collection | None = None) -> ForgetSplit:
    """Split the generative model's training rows into D_f / D_r.

    ``linked`` are patients of flagged images, ``requested`` those who asked to be forgotten; a
    requested patient that is not in ``known`` (default: the training rows' patients) is an error
    naming it. A requested patient who is known but never trained the model adds no images.
    """
    ids = training_rows["patient"].astype(str)
    requested_ids = check_requested(requested, set(ids) if known is None else known)
    linked_ids = sorted({str(p) for p in linked})
    stray = [p for p in linked_ids if p not in set(ids)]
    if stray:
        raise DataError(f"audit linked patient(s) outside the training rows: {', '.join(stray)}")
    in_forget = ids.isin(set(linked_ids) | set(requested_ids)).to_numpy()
    return ForgetSplit(forget=training_rows[in_forget].reset_index(drop=True),
                       remain=training_rows[~in_forget].reset_index(drop=True),
                       linked=linked_ids, requested=requested_ids)


def pairs_grid(synthetic: np.ndarray, real: np.ndarray, scores: np.ndarray, max_pairs: int = 16,
               pad: int = 2) -> np.ndarray:
    """Flagged pairs for the hospital's own staff: synthetic (top) above its matched real image, highest score first."""
    order = np.argsort(-scores)[:max_pairs]
    if not len(order):
        raise DataError("no flagged pairs to draw")
    return tile_rows([synthetic[order], real[order]], pad)
