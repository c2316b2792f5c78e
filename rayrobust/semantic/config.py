"""`SemanticConfig`: every knob of the SRD latent pipeline (extract -> cluster -> dictionaries -> purify).

Validated on construction, in the style of `rayrobust.config`: each check names the field, the
value and the fix. The lead composes it into `ExperimentConfig` as the `semantic:` section.

Example:
    >>> cfg = SemanticConfig(k_max=3, patch_size=4)
    >>> SemanticConfig(k_max=0)
    Traceback (most recent call last):
    ...
    rayrobust.errors.ConfigError: semantic.k_max=0 must be >= 1 (K is chosen per class in [1, k_max]); use 1 ...
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from ..errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class SemanticConfig:
    # --- source ---------------------------------------------------------------------------------
    source_method: str = "standard"  # method whose latest checkpoint in <run_dir>/<method>/checkpoints gives f(x)
    extract_limit: Optional[int] = None  # use only the first N training images (None = all of data.train_limit)
    overwrite: bool = False  # replace artifacts made from other inputs (otherwise refuse)
    # --- latent extraction (Ray Data) ------------------------------------------------------------
    num_actors: int = 2  # Ray Data actors running forward_features (one GPU each when the cluster has GPUs)
    extract_batch_size: int = 256  # images per forward_features call
    use_gpu: Optional[bool] = None  # None = use GPUs when the cluster has them
    # --- adaptive clustering (faiss k-means per class) -------------------------------------------
    k_max: int = 5  # K is chosen per class in [1, k_max]; a Tune dimension (`n_clusters`)
    silhouette_threshold: float = 0.2  # K=1 unless the best K>=2 scores above this (silhouette, [-1, 1])
    silhouette_sample: int = 2000  # points per class scored by silhouette (also the k-means++ seeding sample)
    kmeans_iters: int = 25  # Lloyd iterations at most (stops earlier when no assignment changes)
    kmeans_n_init: int = 3  # k-means++ initialisations per (class, K >= 2); the lowest inertia wins
    num_shards: int = 2  # Ray actors holding latent shards for the k-means assignment step
    var_floor: float = 1e-4  # floor on per-dimension cluster variances, latent units^2 (Mahalanobis)
    # --- dictionaries (sparse coding of high-frequency patches) ----------------------------------
    patch_size: int = 4  # p: p x p patches, pixels (4 for 28x28 Fashion-MNIST; 4-6 for 32x32 CIFAR)
    patch_stride: int = 2  # pixels between patch origins; < patch_size overlaps and averages
    n_atoms: int = 32  # atoms per cluster dictionary (2x overcomplete for 1-channel 4x4 patches)
    sparsity: float = 0.1  # lambda, (pixel units)^2: 0.5*||x - aD||^2 + lambda*|a|_1; ~3 codes per patch
    fista_iters: int = 30  # FISTA iterations per sparse code, in learning and in purification (unrolled)
    dict_iters: int = 20  # alternating (sparse code, MOD dictionary update) rounds
    blur_sigma: float = 1.0  # Gaussian blur sigma, pixels: x_low = blur(x), x_high = x - x_low
    max_images_per_cluster: int = 500  # source images per cluster used to learn its dictionary
    max_patches_per_cluster: int = 20000  # patches sampled from those images
    dict_actors: int = 2  # Ray actors learning dictionaries (clusters are split among them)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.source_method, str) and self.source_method != "",
               f"semantic.source_method={self.source_method!r} must name a trained method, e.g. 'standard'")
        _check(self.extract_limit is None or self.extract_limit >= 1,
               f"semantic.extract_limit={self.extract_limit} must be a positive integer or null (all images)")
        _check(self.num_actors >= 1, f"semantic.num_actors={self.num_actors} must be >= 1")
        _check(self.extract_batch_size >= 1, f"semantic.extract_batch_size={self.extract_batch_size} must be >= 1")
        _check(self.k_max >= 1, f"semantic.k_max={self.k_max} must be >= 1 (K is chosen per class in [1, k_max]); "
                                "use 1 for one cluster per class")
        _check(-1.0 <= self.silhouette_threshold <= 1.0,
               f"semantic.silhouette_threshold={self.silhouette_threshold} must be in [-1, 1] (silhouette scores are)")
        _check(self.silhouette_sample >= 10,
               f"semantic.silhouette_sample={self.silhouette_sample} must be >= 10 points (2000 is a good value)")
        _check(self.kmeans_iters >= 1, f"semantic.kmeans_iters={self.kmeans_iters} must be >= 1")
        _check(self.kmeans_n_init >= 1, f"semantic.kmeans_n_init={self.kmeans_n_init} must be >= 1")
        _check(self.num_shards >= 1, f"semantic.num_shards={self.num_shards} must be >= 1")
        _check(self.var_floor > 0, f"semantic.var_floor={self.var_floor} must be > 0 (it keeps Mahalanobis finite)")
        _check(self.patch_size >= 2, f"semantic.patch_size={self.patch_size} must be >= 2 pixels")
        _check(1 <= self.patch_stride <= self.patch_size,
               f"semantic.patch_stride={self.patch_stride} must be in [1, patch_size={self.patch_size}] "
               "(a larger stride would leave pixels unreconstructed)")
        _check(self.n_atoms >= 2, f"semantic.n_atoms={self.n_atoms} must be >= 2")
        _check(self.sparsity >= 0, f"semantic.sparsity={self.sparsity} must be >= 0 (0 = least squares codes)")
        _check(self.fista_iters >= 1, f"semantic.fista_iters={self.fista_iters} must be >= 1")
        _check(self.dict_iters >= 1, f"semantic.dict_iters={self.dict_iters} must be >= 1")
        _check(self.blur_sigma > 0, f"semantic.blur_sigma={self.blur_sigma} must be > 0 pixels (1.0 is a good value)")
        _check(self.max_images_per_cluster >= 1,
               f"semantic.max_images_per_cluster={self.max_images_per_cluster} must be >= 1")
        _check(self.max_patches_per_cluster >= self.n_atoms,
               f"semantic.max_patches_per_cluster={self.max_patches_per_cluster} must be >= n_atoms={self.n_atoms}")
        _check(self.dict_actors >= 1, f"semantic.dict_actors={self.dict_actors} must be >= 1")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
