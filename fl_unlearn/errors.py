"""Exception types that carry one clear, user-facing message."""


class FlUnlearnError(Exception):
    """Base class: the message names the bad input and, where possible, the fix."""


class ConfigError(FlUnlearnError, ValueError):
    """A run-configuration value is missing, of the wrong type or out of range."""


class DataError(FlUnlearnError, ValueError):
    """A data source, cohort table or image file is unusable."""
