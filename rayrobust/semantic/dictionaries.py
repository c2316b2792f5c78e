"""Semantic reconstruction dictionaries (docs/methods.md §1.4): one patch dictionary per latent cluster,
learned on the high-frequency component of that cluster's source images. No Ray here.

Per cluster k: up to `max_images` member images (seeded choice) -> x_high = x - blur(x, sigma_b)
-> p x p patches every `stride` pixels -> up to `max_patches` non-flat patches (seeded) ->
`sparse.learn_dictionary` (FISTA + MOD) -> D_k (n_atoms, C*p*p), unit-norm atoms.

Defaults for 28x28 Fashion-MNIST: p=4, stride 2 (13x13 = 169 overlapping patches per image),
32 atoms (2x overcomplete), lambda 0.1 (about 3 non-zero codes per patch), sigma_b = 1 pixel.

Artifacts: dictionaries/cluster_XXX.npy (n_atoms, C*p*p) float32 + dictionaries/manifest.json.
`DictionaryWorker` is the plain class the Ray wrapper (`dictionaries_ray.py`) turns into actors.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError
from ..hardware import ray_node_id
from .artifacts import read_manifest
from .patches import patches, split_frequencies
from .sparse import fista, learn_dictionary, relative_error

FORMAT = "rayrobust-dictionaries-v1"
DICTIONARIES_DIR = "dictionaries"


@dataclass(frozen=True)
class DictionaryParams:
    patch_size: int = 4  # p, pixels
    patch_stride: int = 2  # pixels between patch origins (< p: overlapping, averaged on reassembly)
    n_atoms: int = 32  # atoms per dictionary
    sparsity: float = 0.1  # lambda, (pixel units)^2
    fista_iters: int = 30  # FISTA iterations per code (learning and purification)
    dict_iters: int = 20  # (code, MOD update) rounds
    blur_sigma: float = 1.0  # pixels
    max_images_per_cluster: int = 500
    max_patches_per_cluster: int = 20000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.patch_size < 2 or not 1 <= self.patch_stride <= self.patch_size:
            raise ConfigError(f"patch_size={self.patch_size} must be >= 2 and patch_stride={self.patch_stride} "
                              f"in [1, patch_size]")
        if self.n_atoms < 2 or self.sparsity < 0 or self.fista_iters < 1 or self.dict_iters < 1 or self.blur_sigma <= 0:
            raise ConfigError(f"bad dictionary parameters {asdict(self)}: n_atoms >= 2, sparsity >= 0, "
                              "fista_iters >= 1, dict_iters >= 1, blur_sigma > 0")

    @classmethod
    def from_config(cls, cfg: Any) -> "DictionaryParams":
        """From a SemanticConfig (or anything with the same field names)."""
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


def _cluster_seed(seed: int, cluster: int) -> int:
    return int(np.random.SeedSequence([seed, 7919, cluster]).generate_state(1)[0] % (2 ** 31))


def select_members(index: np.ndarray, assignment: np.ndarray, cluster: int, max_images: int, seed: int) -> np.ndarray:
    """Dataset indices of up to `max_images` members of `cluster` (seeded choice, sorted)."""
    members = np.sort(index[assignment == cluster])
    if len(members) > max_images:
        rng = np.random.RandomState(_cluster_seed(seed, cluster))
        members = np.sort(rng.choice(members, max_images, replace=False))
    return members


def patch_set(images: torch.Tensor, params: DictionaryParams, seed: int) -> torch.Tensor:
    """High-frequency patches (P, C*p*p) of images (n, C, H, W): non-flat ones, at most max_patches (seeded)."""
    _, high = split_frequencies(images, params.blur_sigma)  # (n, C, H, W)
    X = patches(high, params.patch_size, params.patch_stride).reshape(-1, images.shape[1] * params.patch_size ** 2)
    norms = X.norm(dim=1)
    X = X[norms > 1e-4]  # flat background carries no high-frequency structure
    if len(X) > params.max_patches_per_cluster:
        gen = torch.Generator().manual_seed(seed)
        X = X[torch.randperm(len(X), generator=gen)[:params.max_patches_per_cluster]]
    return X.contiguous()


def learn_cluster_dictionary(images: torch.Tensor, params: DictionaryParams, cluster: int,
                             device: str | torch.device = "cpu") -> Tuple[np.ndarray, Dict[str, Any]]:
    """D_k (n_atoms, C*p*p) float32 for one cluster's images (n, C, H, W) in [0,1], and what it took."""
    seed = _cluster_seed(params.seed, cluster)
    X = patch_set(images, params, seed)
    if len(X) < params.n_atoms:
        from .errors import LatentError

        raise LatentError(f"cluster {cluster}: only {len(X)} non-flat patches from {len(images)} images, fewer than "
                          f"n_atoms={params.n_atoms}; lower semantic.n_atoms or raise max_images_per_cluster")
    D, info = learn_dictionary(X.to(device), params.n_atoms, lam=params.sparsity, fista_iters=params.fista_iters,
                               rounds=params.dict_iters, seed=seed)
    info.update(images=len(images), cluster=cluster, objective=[round(o, 6) for o in info["objective"]])
    return D.float().cpu().numpy(), info


def cross_errors(images_by_cluster: Dict[int, torch.Tensor], dicts: Dict[int, np.ndarray],
                 params: DictionaryParams) -> np.ndarray:
    """(K, K) relative high-frequency reconstruction error of cluster i's images with dictionary j."""
    keys = sorted(dicts)
    out = np.zeros((len(keys), len(keys)))
    for a, i in enumerate(keys):
        _, high = split_frequencies(images_by_cluster[i], params.blur_sigma)
        X = patches(high, params.patch_size, params.patch_stride).reshape(-1, high.shape[1] * params.patch_size ** 2)
        for b, j in enumerate(keys):
            D = torch.from_numpy(dicts[j])
            out[a, b] = relative_error(X, fista(X, D, params.sparsity, params.fista_iters) @ D)
    return out


class DictionaryWorker:
    """Learns dictionaries for the clusters it is handed. Plain class; a Ray actor at the call site."""

    def __init__(self, threads: Optional[int] = None, source: Any = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.source = source  # an ImageSource: this worker loads its own copy of the images

    def learn_members(self, cluster: int, members: np.ndarray, params: DictionaryParams) -> Tuple[int, np.ndarray, Dict]:
        """`learn` on the images at dataset positions `members` of this worker's own copy of the source."""
        images = self.source.load().x[torch.as_tensor(members, dtype=torch.long)].contiguous()
        return self.learn(cluster, images, params)

    def learn(self, cluster: int, images: torch.Tensor, params: DictionaryParams) -> Tuple[int, np.ndarray, Dict]:
        t0 = time.perf_counter()
        D, info = learn_cluster_dictionary(images, params, cluster, self.device)
        info.update(node=ray_node_id(), pid=os.getpid(), wall_seconds=round(time.perf_counter() - t0, 3))
        return cluster, D, info


# ------------------------------------------------------------------------------------------------
# Artifacts
# ------------------------------------------------------------------------------------------------
def dictionary_file(cluster: int) -> str:
    return f"cluster_{cluster:03d}.npy"


def save_dictionaries(directory: "Location", dicts: Dict[int, np.ndarray], infos: Dict[int, Dict],
                      params: DictionaryParams, extra: Dict[str, Any]) -> Dict[str, Any]:
    """Write cluster_XXX.npy files and manifest.json into `directory` (the caller makes it atomic)."""
    from .artifacts import save_npy

    for k, D in dicts.items():
        save_npy(directory / dictionary_file(k), D.astype(np.float32))
    manifest = {"format": FORMAT, "params": asdict(params), "num_clusters": len(dicts),
                "files": {str(k): dictionary_file(k) for k in sorted(dicts)},
                "clusters": {str(k): infos[k] for k in sorted(infos)}, **extra}
    from ..io import write_json

    write_json(directory / "manifest.json", manifest)
    return manifest


def load_dictionaries(directory: "Where") -> Tuple[np.ndarray, Dict[str, Any]]:  # noqa: F821
    """(dictionaries (K, n_atoms, C*p*p) float32 in cluster order, manifest), from a local path or URI."""
    from ..location import as_location
    from .artifacts import load_npy

    directory = as_location(directory)
    manifest = read_manifest(directory, stage="dictionaries",
                             hint="run the dictionaries stage first (`rayrobust dictionaries`)")
    files = manifest["files"]
    return np.stack([load_npy(directory / files[str(k)]) for k in range(len(files))]), manifest


__all__ = ["DictionaryParams", "DictionaryWorker", "cross_errors", "learn_cluster_dictionary", "load_dictionaries",
           "patch_set", "save_dictionaries", "select_members", "DICTIONARIES_DIR"]
