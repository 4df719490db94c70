"""Scalar metrics with uncertainty: ROC AUC (scikit-learn) with a patient-free bootstrap 95% interval."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc_with_ci(labels: np.ndarray, scores: np.ndarray, *, bootstraps: int = 1000, seed: int = 0) -> dict:
    """ROC AUC and its percentile-bootstrap 95% interval (resamples with both classes present)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    auc = float(roc_auc_score(labels, scores))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstraps):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].min() == labels[idx].max():
            continue
        samples.append(roc_auc_score(labels[idx], scores[idx]))
    low, high = (np.percentile(samples, [2.5, 97.5]) if samples else (float("nan"), float("nan")))
    return {"auc": auc, "ci_low": float(low), "ci_high": float(high), "n": len(labels)}
