"""SRD's semantic latent pipeline (METHODS.md §1): latents -> adaptive clusters -> dictionaries -> purifier.

Core modules (no Ray): `extract.extract_latents`, `kmeans`, `clustering`, `patches`, `sparse`,
`dictionaries`, `purify`. Ray wrappers: `extract.run_extract` (Ray Data actor pool),
`cluster_ray.run_cluster` (shard actors), `dictionaries_ray.run_dictionaries` (actors).
Stage entry points over a run directory: `stages`.
"""
from .config import SemanticConfig
from .purify import PurifiedClassifier, Purifier, load_purifier

__all__ = ["SemanticConfig", "Purifier", "PurifiedClassifier", "load_purifier"]
