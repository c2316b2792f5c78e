"""SRD purification at inference (docs/methods.md §1.6): a deterministic, differentiable function of x.

    z      = feature_model.forward_features(x)                        (N, d)
    k_hat  = argmin_k sum_j (z_j - mu_kj)^2 / sigma2_kj                nearest cluster over ALL classes
    x_low, x_high = blur(x), x - blur(x)
    A      = FISTA(patches(x_high), D_k_hat, lambda, fista_iters)      unrolled, fixed iteration count
    x_hat  = clamp(x_low + fold(A D_k_hat), 0, 1)                      overlapping patches averaged

The cluster choice is piecewise constant in x (zero gradient almost everywhere, as it truly is);
gradients flow through the blur, the unrolled FISTA and the reassembly. Attack
`PurifiedClassifier(purifier, classifier)` end to end (docs/evaluation.md §3: adaptive attacks; add BPDA for
the cluster choice if you want a stronger one). Nothing is random: same x -> same x_hat.

Example:
    >>> purifier = load_purifier("runs/demo/semantic", model)          # clusters/ + dictionaries/
    >>> defended = PurifiedClassifier(purifier, model)                 # logits of the purified image
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from .clustering import CLUSTERS_DIR, load_clusters
from .dictionaries import DICTIONARIES_DIR, load_dictionaries
from .errors import LatentError
from .patches import fold, patches, split_frequencies
from .sparse import fista, lipschitz


class Purifier(nn.Module):
    """x (N, C, H, W) in [0,1] -> purified x_hat of the same shape, in [0,1]."""

    def __init__(self, feature_model: nn.Module, means: torch.Tensor, variances: torch.Tensor,
                 dictionaries: torch.Tensor, *, patch_size: int, patch_stride: int, sparsity: float,
                 fista_iters: int, blur_sigma: float, cluster_class: Optional[torch.Tensor] = None):
        super().__init__()
        means, variances, dictionaries = (torch.as_tensor(np.asarray(a), dtype=torch.float32)
                                          for a in (means, variances, dictionaries))
        k, d = means.shape
        if variances.shape != (k, d) or dictionaries.ndim != 3 or len(dictionaries) != k:
            raise LatentError(f"purifier needs means and variances (K, d) and dictionaries (K, atoms, C*p*p) for the "
                              f"same K; got {tuple(means.shape)}, {tuple(variances.shape)}, {tuple(dictionaries.shape)}")
        num_features = getattr(feature_model, "num_features", None)
        if num_features is not None and num_features != d:
            raise LatentError(f"the clusters live in a {d}-d latent space but the model's forward_features gives "
                              f"{num_features}-d latents: use the model the latents were extracted with")
        self.feature_model = feature_model
        self.register_buffer("means", means)  # (K, d)
        self.register_buffer("inv_var", 1.0 / variances)  # (K, d)
        self.register_buffer("dictionaries", dictionaries)  # (K, atoms, C*p*p)
        self.register_buffer("lipschitz", lipschitz(dictionaries))  # (K,)
        self.register_buffer("cluster_class", torch.as_tensor(
            np.asarray(cluster_class) if cluster_class is not None else np.full(k, -1), dtype=torch.long))  # (K,)
        self.patch_size, self.patch_stride = patch_size, patch_stride
        self.sparsity, self.fista_iters, self.blur_sigma = float(sparsity), int(fista_iters), float(blur_sigma)

    @torch.no_grad()
    def nearest_cluster(self, x: torch.Tensor) -> torch.Tensor:
        """Index (N,) of the cluster nearest to f(x) in diagonal Mahalanobis distance, over all classes."""
        z = self.feature_model.forward_features(x)  # (N, d)
        d2 = (z.pow(2) @ self.inv_var.T - 2 * z @ (self.means * self.inv_var).T
              + (self.means.pow(2) * self.inv_var).sum(1))  # (N, K)
        return d2.argmin(1)

    def reconstruct_high(self, x_high: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """Sparse-code every patch of x_high (N, C, H, W) on its image's dictionary and reassemble."""
        shape = tuple(x_high.shape[1:])
        X = patches(x_high, self.patch_size, self.patch_stride)  # (N, L, C*p*p)
        if X.shape[-1] != self.dictionaries.shape[-1]:
            raise LatentError(f"images give patches of {X.shape[-1]} values but the dictionaries' atoms have "
                              f"{self.dictionaries.shape[-1]}: the dictionaries were learned for other images")
        D = self.dictionaries[clusters]  # (N, atoms, C*p*p)
        A = fista(X, D, self.sparsity, self.fista_iters, L=self.lipschitz[clusters])  # (N, L, atoms)
        return fold(A @ D, shape, self.patch_size, self.patch_stride)  # (N, C, H, W)

    def forward(self, x: torch.Tensor, clusters: Optional[torch.Tensor] = None) -> torch.Tensor:
        clusters = self.nearest_cluster(x) if clusters is None else clusters
        x_low, x_high = split_frequencies(x, self.blur_sigma)  # (N, C, H, W) each
        return (x_low + self.reconstruct_high(x_high, clusters)).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        k, atoms, m = self.dictionaries.shape
        return (f"clusters={k}, atoms={atoms}, patch={self.patch_size}/{self.patch_stride}, "
                f"lambda={self.sparsity}, fista_iters={self.fista_iters}, blur_sigma={self.blur_sigma}")


class PurifiedClassifier(nn.Module):
    """logits = classifier(purifier(x)): the whole defended decision function, for end-to-end attacks."""

    def __init__(self, purifier: Purifier, classifier: nn.Module):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purifier(x))


def load_purifier(semantic_dir: "Where", feature_model: nn.Module) -> Purifier:  # noqa: F821
    """A Purifier from `<semantic_dir>/clusters/` and `<semantic_dir>/dictionaries/` (a local path or URI)."""
    from ..location import as_location

    semantic_dir = as_location(semantic_dir)
    cl = load_clusters(semantic_dir / CLUSTERS_DIR)
    dicts, manifest = load_dictionaries(semantic_dir / DICTIONARIES_DIR)
    p = manifest["params"]
    return Purifier(feature_model, cl["means"], cl["variances"], dicts, patch_size=p["patch_size"],
                    patch_stride=p["patch_stride"], sparsity=p["sparsity"], fista_iters=p["fista_iters"],
                    blur_sigma=p["blur_sigma"], cluster_class=cl["cluster_class"]).eval()


def purify_batches(purifier: Purifier, x: torch.Tensor, batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """(purified images (N, C, H, W), chosen clusters (N,)) without gradients, in batches."""
    out, ks = [], []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            k = purifier.nearest_cluster(xb)
            out.append(purifier(xb, k))
            ks.append(k)
    return torch.cat(out), torch.cat(ks)
