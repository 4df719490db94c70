"""Entanglement of the forget and remain sets (Zhao et al., NeurIPS 2024; design algorithms.md §5)."""

from __future__ import annotations

import numpy as np

from fl_unlearn.errors import DataError


def entanglement_score(forget: np.ndarray, remain: np.ndarray) -> dict:
    """Zhao et al.'s ES = (within-group spread of D_r + of D_f) / ½(‖μ_r − μ‖² + ‖μ_f − μ‖²), μ their midpoint.

    ``forget`` [n_f, D] and ``remain`` [n_r, D] are embeddings (here: the retrieval network's identity
    space). ES is unbounded (higher = more entangled, harder to unlearn); ``percent`` is the bounded
    share 100 · ES / (1 + ES), the variance not explained by forget/remain membership.
    """
    forget, remain = np.asarray(forget, dtype=np.float64), np.asarray(remain, dtype=np.float64)
    if forget.ndim != 2 or remain.ndim != 2 or forget.shape[1] != remain.shape[1] or not len(forget) or not len(remain):
        raise DataError(f"entanglement needs non-empty [n,D] embeddings of D_f and D_r, got {forget.shape} and "
                        f"{remain.shape}")
    mu_f, mu_r = forget.mean(0), remain.mean(0)
    mu = 0.5 * (mu_f + mu_r)
    within = ((remain - mu_r) ** 2).sum(1).mean() + ((forget - mu_f) ** 2).sum(1).mean()
    between = 0.5 * (((mu_r - mu) ** 2).sum() + ((mu_f - mu) ** 2).sum())
    es = float(within / between) if between > 0 else float("inf")
    percent = 100.0 if not np.isfinite(es) else 100.0 * es / (1.0 + es)
    return {"es": es, "percent": percent, "forget": len(forget), "remain": len(remain)}
