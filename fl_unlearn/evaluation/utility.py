"""Utility of a catalog: a cardiomegaly classifier trained on it, tested on real held-out patients."""

from __future__ import annotations

import numpy as np
import torch

from fl_unlearn.errors import DataError
from fl_unlearn.evaluation.metrics import auc_with_ci
from fl_unlearn.models.classifier import build_classifier
from fl_unlearn.training.classifier import ClassifierTrainConfig, predict, train_classifier


def utility_auc(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                test_labels: np.ndarray, *, backbone: str, config: ClassifierTrainConfig,
                device: torch.device | str = "cpu") -> dict:
    """ROC AUC (bootstrap 95% CI) on the real test set of a classifier trained on ``train_images`` only."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    for name, labels in (("training", train_labels), ("test", test_labels)):
        if len(np.unique(labels)) < 2:
            raise DataError(f"the {name} set of the utility classifier holds one class only; AUC is undefined")
    torch.manual_seed(config.seed)
    model = build_classifier(backbone).to(device)
    stats = train_classifier(model, train_images, train_labels, config)
    result = auc_with_ci(test_labels, predict(model, test_images), seed=config.seed)
    return {**result, "train_images": len(train_images), "seconds": round(stats["seconds"], 1)}
