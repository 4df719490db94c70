"""Privacy measures: re-identification audit, forget/remain sets, anonymization metrics, memorization."""
