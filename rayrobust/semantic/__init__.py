"""SRD's semantic latent pipeline (docs/methods.md §1): latents -> adaptive clusters -> dictionaries -> purifier.

Core modules (no Ray): `extract.extract_latents`, `kmeans`, `clustering`, `patches`, `sparse`,
`dictionaries`, `purify`. Ray wrappers: `extract.run_extract` (Ray Data actor pool),
`cluster_ray.run_cluster` (shard actors), `dictionaries_ray.run_dictionaries` (actors).
Stage entry points over a run directory: `stages`.

Names are imported lazily, so `from rayrobust.semantic.config import SemanticConfig` (what
`rayrobust.config` needs) does not load torch, faiss or pyarrow.
"""
from importlib import import_module

_EXPORTS = {"SemanticConfig": "config", "Purifier": "purify", "PurifiedClassifier": "purify",
            "load_purifier": "purify"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
