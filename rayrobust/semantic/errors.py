"""Errors the semantic stages raise; all are `RayRobustError`s, so the CLI prints one line and exits 2."""
from __future__ import annotations

from ..errors import ConfigError, DataError, RayRobustError


class ArtifactMismatchError(RayRobustError):
    """An artifact already on disk was made from other inputs; nothing was overwritten."""


class MissingArtifactError(RayRobustError):
    """A stage needs the artifact of an earlier stage that is not there yet."""


class LatentError(DataError):
    """Latents are unusable: NaN/inf values, wrong dimension, a class too small to cluster."""


__all__ = ["ArtifactMismatchError", "ConfigError", "DataError", "LatentError", "MissingArtifactError",
           "RayRobustError"]
