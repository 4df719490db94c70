"""A hospital's rounds of the real-data reference classifier (the utility yardstick and the domain-feature extractor)."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord

from clients.hospital import Hospital
from fl_unlearn.models.classifier import build_classifier
from fl_unlearn.training.classifier import ClassifierTrainConfig, train_classifier
from fl_unlearn.training.common import derived_seed

State = dict[str, torch.Tensor]


def classifier_round(hospital: Hospital, state: State, config: ConfigRecord) -> tuple[State, dict]:
    """Local cardiomegaly-classifier steps on this hospital's training images."""
    cfg = hospital.config
    model = hospital.load(build_classifier(cfg.classifier_backbone), state)
    rows = hospital.split.train
    stats = train_classifier(model, hospital.cohort.load_images(rows), rows["label"].to_numpy(), ClassifierTrainConfig(
        steps=cfg.classifier_local_steps, bf16=cfg.bf16,
        seed=derived_seed(cfg.seed, "classifier", int(config["round"]), hospital.index)))
    return model.state_dict(), {"num-examples": len(rows), "loss": stats["loss"], "seconds": stats["seconds"]}
