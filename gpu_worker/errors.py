"""Failures a user can act on. The worker records `type`, the message and the phase."""


class JobFailure(Exception):
    """Base: the message is shown to the user as it is, so it must say what to change."""


class ConfigError(JobFailure):
    """The spec asks for something this worker cannot do (e.g. bf16 on a CPU)."""


class ModelLoadError(JobFailure):
    """The base model could not be found, downloaded or loaded."""


class DatasetError(JobFailure):
    """The dataset blob is missing, or no row fits max_length."""
