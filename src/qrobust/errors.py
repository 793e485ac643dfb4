"""User-facing errors. The CLI prints their message as one line and exits non-zero."""


class QrobustError(Exception):
    """An error caused by the user's input (files, configs, arguments), not by a bug."""


class DataError(QrobustError):
    """A dataset is missing, truncated, corrupt or has an unexpected checksum."""


class CheckpointError(QrobustError):
    """A checkpoint file is not what it claims to be."""


class ConfigError(QrobustError):
    """An invalid configuration, recipe or argument."""
