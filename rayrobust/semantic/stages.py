"""The SRD latent pipeline as three stages over a run directory, for the CLI, the pipeline and jobs/.

The run directory is a local path or a storage URI; the images are named (`ImageSource`) and loaded
by the Ray workers that use them, never by the driver.

    <run_dir>/<source_method>/checkpoints/epoch_XXX/        (from `rayrobust train`)
    <run_dir>/semantic/latents/        extract       Ray Data actor pool     -> Parquet + manifest
    <run_dir>/semantic/clusters/       cluster       Ray actors, shards      -> clusters.json, *.npy
    <run_dir>/semantic/dictionaries/   dictionaries  Ray actors, per cluster -> cluster_XXX.npy + manifest

Each stage reuses its artifact when its inputs are unchanged and refuses to overwrite one made from
other inputs unless `semantic.overwrite` is set. `build_purifier(run_dir, model)` then gives the
inference-time purifier.

Example:
    >>> train = source_images(cfg.data, cfg.semantic)
    >>> run_extract_stage(cfg.semantic, cfg.run_dir, None, train)   # None: latest source_method checkpoint
    >>> run_cluster_stage(cfg.semantic, cfg.run_dir)
    >>> run_dictionaries_stage(cfg.semantic, cfg.run_dir, train)
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

from torch import nn

from ..data import ArrayDataset
from ..layout import SEMANTIC, RunLayout
from ..location import Location, Where, as_location
from .config import SemanticConfig
from .purify import Purifier, load_purifier
from .source import ImageSource

SEMANTIC_DIR = SEMANTIC
Images = Union[ImageSource, ArrayDataset]


def semantic_dir(run_dir: Where) -> Location:
    return RunLayout(run_dir).semantic


def source_checkpoint(cfg: SemanticConfig, run_dir: Where) -> Location:
    """The latest valid checkpoint of `cfg.source_method` in the run directory."""
    return RunLayout(run_dir).latest_checkpoint(cfg.source_method, hint=(
        f"train the source model first (`rayrobust train --set train.method={cfg.source_method}`) or pass --checkpoint"))


def source_images(data_cfg: Any, cfg: SemanticConfig) -> ImageSource:
    """The training images the latents are extracted from: data.name's train split, the first
    data.train_limit images, then the first semantic.extract_limit of those (loaded by the workers)."""
    return ImageSource.from_config(data_cfg, cfg)


def run_extract_stage(cfg: SemanticConfig, run_dir: Where, checkpoint: Optional[Where],
                      dataset: Images) -> Dict[str, Any]:
    """Latents of `dataset` under the source checkpoint -> <run_dir>/semantic/latents/. Returns the manifest."""
    from .extract import run_extract

    checkpoint = as_location(checkpoint) if checkpoint else source_checkpoint(cfg, run_dir)
    what = f"the first {dataset.limit}" if isinstance(dataset, ImageSource) and dataset.limit else "the"
    print(f"== extract: latents of {what} {dataset.name} training images from {checkpoint}", flush=True)
    return run_extract(checkpoint, dataset, semantic_dir(run_dir), num_actors=cfg.num_actors,
                       batch_size=cfg.extract_batch_size, use_gpu=cfg.use_gpu, overwrite=cfg.overwrite)


def run_cluster_stage(cfg: SemanticConfig, run_dir: Where,
                      checkpoint: Optional[Where] = None) -> Dict[str, Any]:
    """Adaptive per-class k-means of the latents -> <run_dir>/semantic/clusters/. Returns clusters.json.

    With `checkpoint`, the latents' dimension is checked against that model's forward_features.
    """
    from .cluster_ray import run_cluster

    expected_dim = None
    if checkpoint is not None:
        from ..checkpoint import model_from_checkpoint

        expected_dim = int(model_from_checkpoint(checkpoint).num_features)
    print(f"== cluster: K per class in [1, {cfg.k_max}] by silhouette (threshold {cfg.silhouette_threshold}), "
          f"{cfg.num_shards} shard actor(s)", flush=True)
    sdir = semantic_dir(run_dir)
    return run_cluster(sdir, sdir, k_max=cfg.k_max, threshold=cfg.silhouette_threshold, iters=cfg.kmeans_iters,
                       n_init=cfg.kmeans_n_init,
                       sample_size=cfg.silhouette_sample, seed=cfg.seed, var_floor=cfg.var_floor,
                       num_shards=cfg.num_shards, expected_dim=expected_dim, overwrite=cfg.overwrite)


def run_dictionaries_stage(cfg: SemanticConfig, run_dir: Where, dataset: Images) -> Dict[str, Any]:
    """One sparse dictionary per cluster -> <run_dir>/semantic/dictionaries/. Returns the manifest.

    `dataset` must be the one given to the extract stage (checked by content hash).
    """
    from .dictionaries import DictionaryParams
    from .dictionaries_ray import run_dictionaries

    params = DictionaryParams.from_config(cfg)
    print(f"== dictionaries: {params.n_atoms} atoms of {params.patch_size}x{params.patch_size} high-frequency "
          f"patches per cluster, {cfg.dict_actors} actor(s)", flush=True)
    sdir = semantic_dir(run_dir)
    return run_dictionaries(dataset, sdir, sdir, params, num_actors=cfg.dict_actors, use_gpu=cfg.use_gpu,
                            overwrite=cfg.overwrite)


def build_purifier(run_dir: Where, feature_model: nn.Module) -> Purifier:
    """The inference-time purifier from the run's clusters and dictionaries (see purify.py)."""
    return load_purifier(semantic_dir(run_dir), feature_model)
