"""AUC with a bootstrap interval, and the pixel-space copy detector."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from fl_unlearn.evaluation.metrics import auc_with_ci
from fl_unlearn.privacy.memorization import nearest_neighbour_ratio


def test_auc_equals_scikit_learn_and_the_interval_contains_it():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = labels * 0.8 + rng.normal(0, 0.6, 300)
    result = auc_with_ci(labels, scores, bootstraps=300)
    assert result["auc"] == roc_auc_score(labels, scores)
    assert result["ci_low"] < result["auc"] < result["ci_high"]
    assert result["n"] == 300


def test_planted_copies_are_flagged_and_fresh_images_are_not():
    rng = np.random.default_rng(0)
    training = (rng.random((200, 16, 16)) * 255).astype(np.uint8)
    copies = np.clip(training[:10].astype(int) + rng.integers(-3, 4, (10, 16, 16)), 0, 255).astype(np.uint8)
    fresh = (rng.random((20, 16, 16)) * 255).astype(np.uint8)
    result = nearest_neighbour_ratio(np.concatenate([copies, fresh]), training)
    assert result["flagged"][:10].all()
    np.testing.assert_array_equal(result["nearest"][:10], np.arange(10))
    assert not result["flagged"][10:].any()
