"""Central evaluation: utility AUC, image quality, report tables."""
