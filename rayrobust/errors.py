"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class RayRobustError(Exception):
    """A problem with the user's input (config, data, checkpoint, names); the message says how to fix it."""


class ConfigError(RayRobustError, ValueError):
    """A config value is missing, unknown or out of range."""


class DataError(RayRobustError):
    """A dataset is missing or malformed."""


class CheckpointError(RayRobustError):
    """A checkpoint is missing, truncated, corrupt or unsafe."""


class StorageError(RayRobustError):
    """A storage location (local path or URI) cannot be parsed, reached, read or written."""
