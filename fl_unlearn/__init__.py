"""fl-unlearn: patient-level unlearning for federated latent diffusion models of chest radiographs."""

__version__ = "0.1.0"
