"""One local training loop per model, used by the hospitals and by centralized references."""
