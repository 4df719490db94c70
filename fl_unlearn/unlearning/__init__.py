"""Unlearning of a latent diffusion model: a registry of methods (name → objective) and one local loop."""

from fl_unlearn.unlearning.loop import saliency_mask, saliency_scores, unlearn
from fl_unlearn.unlearning.methods import ALL_METHODS, METHODS, UnlearnConfig, get_method

__all__ = ["ALL_METHODS", "METHODS", "UnlearnConfig", "get_method", "saliency_mask", "saliency_scores", "unlearn"]
