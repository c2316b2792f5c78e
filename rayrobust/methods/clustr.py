"""ClusTR — clustering training (docs/methods.md §2; after Alfarra et al., Magnet loss of Rippel et al. 2016).

The latent r = model.forward_features(x) is clustered per class (K = `train.method_args.clustr.k` clusters per class,
k-means on the training latents), and the model is trained with the Magnet loss so that every
latent sits near a cluster of its own class and far from the clusters of other classes. The model's
head is unused: the decision is the nearest cluster.

- **Clusters** are refreshed every epoch by `begin_epoch`: latents of the whole training set (eval
  mode, no gradient), then per-class k-means with the repository's own `semantic.kmeans.kmeans`,
  seeded by (seed, epoch, class). The clusters of epoch e therefore depend only on the weights at
  the start of e, and every Ray Train rank computes the same ones (rank 0's are also broadcast).
  Stored (and checkpointed as `method_state`): centroids (C·K, d) in class-major order, the
  cluster → class map, and σ² = Σ_n ‖r_n − μ(r_n)‖² / (N − 1) over the training set (the global
  variance of the last refresh, used at inference).
- **Magnet loss**, per batch: each example belongs to the nearest stored centroid of its own class
  (our choice: assignment by the current latent, since batches carry no dataset indices);
  μ_k = mean of the batch members of cluster k (with gradient), σ² = Σ_n ‖r_n − μ(r_n)‖² / (N − 1),
  ℓ_n = max(0, ‖r_n − μ(r_n)‖²/(2σ²) + α + log Σ_{k: class(k) ≠ y_n} exp(−‖r_n − μ_k‖²/(2σ²))),
  α = `alpha` (12.5 in the released code). A cluster with no member in the batch uses its
  stored centroid (constant) — our choice. Batches are the training loop's plain random batches,
  not the paper's cluster-sampled ones (seed cluster + nearest impostor clusters): our choice,
  stated in docs/methods.md §2.2.
- **Decision** (what every attack sees): `ClusterLogits`, logits_c = max_{k in class c}
  −‖f(x) − μ_k‖²/(2σ²) with the stored centroids and σ². Smooth in x, argmax = class of the nearest
  cluster. Never the released code's masked top-L scores, which mask gradients.
- `clustr_qtrades` adds λ·CE(p_clean, p(x_adv)), λ = `weight` (8 in the released code),
  p = softmax of `ClusterLogits`, x_adv one signed-gradient step of 1.25·eps (the released code's
  10/255 at eps 8/255) from a uniform random start in the L∞ eps-ball, maximising KL(p_clean ‖
  p(x_adv)). As in the released code, p_clean keeps its gradient. In the loss, both p's use
  ClusterLogits' formula with the **batch's** cluster means and σ² (those of the Magnet loss), not
  the stored ones — our choice: with the stored centroids and σ² fixed for the epoch, shrinking the
  latent space drives every logit to a constant and the term to 0, and training from scratch
  collapsed to chance accuracy (Fashion-MNIST, 6,000 images, 3 epochs: train accuracy 0.10 at
  λ = 8 and at λ = 1, also with p_clean detached or with KL). With the batch statistics, which are
  scale-invariant like the Magnet loss, the same run reaches 0.70 test accuracy. The attack that
  makes x_adv and every evaluation use the stored clusters, as at inference.

The ℓ2 certificate of a ClusTR model is in `rayrobust.certify`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import METHODS, Method, MethodSettings
from .perturb import attack_mode, check_train_budget, kl_objective, train_pgd

KMEANS_ITERS = 25  # Lloyd iterations per k-means run
KMEANS_N_INIT = 2  # k-means++ restarts per class; the lowest inertia wins
EXTRACT_BATCH = 1000  # images per forward pass when extracting the training latents
MIN_SIGMA2 = 1e-12  # floor of σ² (a collapsed latent space would divide by zero)


def squared_distances(r: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """‖r_n − μ_k‖² (N, K) from explicit differences (no ‖a‖² − 2ab + ‖b‖² cancellation)."""
    return (r[:, None, :] - centroids[None, :, :]).pow(2).sum(-1)


def kmeans_seed(seed: int, epoch: int, c: int) -> int:
    """The k-means seed of class c at epoch `epoch` (fits numpy's 32-bit RandomState with room for restarts)."""
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(c)) % (2 ** 31)


class ClusterLogits(nn.Module):
    """Attackable decision function of a ClusTR model: logits_c = max_{k in c} −‖f(x) − μ_k‖²/(2σ²).

    centroids (C·K, d) in class-major order (clusters of class 0 first), sigma2 a positive scalar.
    """

    def __init__(self, model: nn.Module, centroids: torch.Tensor, sigma2: float, num_classes: int):
        super().__init__()
        if len(centroids) % num_classes:
            raise ConfigError(f"{len(centroids)} centroids do not split into {num_classes} classes")
        self.model = model
        self.num_classes = int(num_classes)
        self.k = len(centroids) // num_classes
        self.register_buffer("centroids", centroids.detach().float().clone())
        self.sigma2 = float(sigma2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cluster_logits(self.model.forward_features(x), self.centroids, self.sigma2, self.num_classes)


def cluster_logits(f: torch.Tensor, centroids: torch.Tensor, sigma2, num_classes: int) -> torch.Tensor:
    """logits (N, C) = max over each class's clusters of −‖f − μ_k‖²/(2σ²); centroids class-major (C·K, d)."""
    scores = -squared_distances(f.float(), centroids) / (2 * sigma2)  # (N, C·K)
    return scores.view(len(f), num_classes, len(centroids) // num_classes).amax(dim=2)


def _latent(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(latent (N, d), anchor) for a training forward pass.

    A bare model: forward_features directly, anchor None. A DistributedDataParallel-wrapped model:
    the forward goes through DDP (so gradients are all-reduced) and the latent is captured at the
    head's input; the anchor is the head's output, to be added to the loss with weight 0 so that
    DDP (find_unused_parameters=False) sees every parameter take part.
    """
    bare = getattr(model, "module", model)
    if bare is model:
        return model.forward_features(x), None
    captured = []
    handle = bare.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        out = model(x)
    finally:
        handle.remove()
    return captured[0], out


@dataclass
class ClusTRSettings(MethodSettings):
    k: int = 2  # clusters per class (per-class k-means of the training latents, refreshed every epoch; Tune: 1..10)
    alpha: float = 12.5  # Magnet-loss margin (12.5 in the released code)

    def __post_init__(self) -> None:
        if not (isinstance(self.k, (int, np.integer)) and not isinstance(self.k, bool) and self.k >= 1):
            raise ConfigError(f"k={self.k!r} must be an integer >= 1 (clusters per class; ClusTR uses 2)")
        if not self.alpha >= 0:
            raise ConfigError(f"alpha={self.alpha} must be >= 0 (the Magnet-loss margin; 12.5 in ClusTR)")


@dataclass
class ClusTRQTRADESSettings(ClusTRSettings):
    weight: float = 8.0  # λ of CE(p_clean, p(x_adv)) (8 in the released code)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.weight >= 0:
            raise ConfigError(f"weight={self.weight} must be >= 0 (QTRADES weight λ; 8 in ClusTR)")


@METHODS.register("clustr")
class ClusTR(Method):
    """Magnet loss on clean data, clusters refreshed every epoch, nearest-cluster decision."""

    name = "clustr"
    Settings = ClusTRSettings
    certifiable = True  # `rayrobust.certify` applies (nearest-centroid decision on forward_features)

    def __init__(self, settings: Optional[ClusTRSettings] = None, *, num_classes: Optional[int] = None,
                 seed: int = 0):
        super().__init__(settings)
        self.k = int(self.settings.k)
        self.alpha = float(self.settings.alpha)
        self.seed = int(seed)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.centroids: Optional[torch.Tensor] = None  # (C·K, d) float32, CPU, class-major
        self.sigma2: Optional[float] = None
        self.epoch: Optional[int] = None  # the epoch whose start the clusters were computed for
        self._cache: Dict[torch.device, torch.Tensor] = {}

    # --- clusters -----------------------------------------------------------------------------------
    @property
    def cluster_class(self) -> torch.Tensor:
        """(C·K,) class of each cluster."""
        return torch.arange(self.num_classes).repeat_interleave(self.k)

    def _centroids(self, device: torch.device) -> torch.Tensor:
        if self.centroids is None:
            raise ConfigError(
                f"{self.name} has no clusters yet: call method.begin_epoch(model, x_train, y_train, epoch, device) "
                f"first (training does this every epoch), or load_state_dict() the method_state of a {self.name} checkpoint")
        if device not in self._cache:
            self._cache[device] = self.centroids.to(device)
        return self._cache[device]

    @torch.no_grad()
    def extract(self, model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Latents (N, d) float32 on CPU of images x, in eval mode (the mode is restored)."""
        bare = getattr(model, "module", model)
        was = bare.training
        bare.eval()
        try:
            out = [bare.forward_features(x[s:s + EXTRACT_BATCH].to(device)).float().cpu()
                   for s in range(0, len(x), EXTRACT_BATCH)]
        finally:
            bare.train(was)
        return torch.cat(out) if out else torch.zeros(0, bare.num_features)

    def begin_epoch(self, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, epoch: int,
                    device: torch.device = torch.device("cpu")) -> None:
        """Recompute the clusters from the current weights: per-class k-means on the training latents."""
        from ..semantic.kmeans import kmeans

        num_classes = self.num_classes if self.num_classes is not None else int(y_train.max()) + 1
        counts = torch.bincount(y_train.long().cpu(), minlength=num_classes)
        short = [(c, int(n)) for c, n in enumerate(counts.tolist()) if n < self.k]
        if short:
            c, n = short[0]
            raise ConfigError(f"class {c} has {n} training image(s), fewer than k={self.k} clusters per class; "
                              f"lower train.method_args.{self.name}.k or train on more data (data.train_limit)")
        r = self.extract(model, x_train, device)
        if not torch.isfinite(r).all():
            raise FloatingPointError(f"{self.name}: the training latents are not finite at epoch {epoch + 1}; lower train.lr")
        y = y_train.long().cpu()
        centroids, sq = [], 0.0
        for c in range(num_classes):
            rows = r[y == c].numpy()
            cent, labels, _ = kmeans(rows, self.k, iters=KMEANS_ITERS, seed=kmeans_seed(self.seed, epoch, c),
                                     n_init=KMEANS_N_INIT)
            cent = torch.from_numpy(np.ascontiguousarray(cent, np.float32))
            rows_t = torch.from_numpy(rows).double()
            sq += (rows_t - cent.double()[torch.from_numpy(labels)]).pow(2).sum().item()
            centroids.append(cent)
        sigma2 = torch.tensor([max(sq / max(len(r) - 1, 1), MIN_SIGMA2)], dtype=torch.float64)
        cent = torch.cat(centroids)  # (C·K, d)
        cent, sigma2 = _broadcast_from_rank0(cent, sigma2, device)
        self.num_classes = num_classes
        self._set(cent, float(sigma2.item()), epoch)

    def _set(self, centroids: torch.Tensor, sigma2: float, epoch: Optional[int]) -> None:
        self.centroids = centroids.detach().float().cpu().contiguous()
        self.sigma2 = float(sigma2)
        self.epoch = epoch
        self._cache = {}

    def clusters(self) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """(centroids (C·K, d), cluster → class (C·K,), σ²) — what the decision and the certificate use."""
        self._centroids(torch.device("cpu"))  # the error when there are none
        return self.centroids, self.cluster_class, self.sigma2

    def state_dict(self) -> Dict[str, torch.Tensor]:
        if self.centroids is None:
            return {}
        return {"centroids": self.centroids.clone(), "cluster_class": self.cluster_class,
                "sigma2": torch.tensor(self.sigma2, dtype=torch.float64),
                "epoch": torch.tensor(-1 if self.epoch is None else self.epoch)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in ("centroids", "cluster_class", "sigma2") if k not in state]
        if missing:
            raise ConfigError(f"{self.name} method state lacks {missing}: not a ClusTR checkpoint")
        cc = state["cluster_class"].long()
        num_classes = int(cc.max()) + 1
        k = len(cc) // num_classes
        if not torch.equal(cc, torch.arange(num_classes).repeat_interleave(k)):
            raise ConfigError(f"{self.name} method state: clusters are not K per class in class-major order")
        self.num_classes, self.k = num_classes, k
        epoch = int(state["epoch"]) if "epoch" in state else -1
        self._set(state["centroids"], float(state["sigma2"]), None if epoch < 0 else epoch)

    # --- training and decision -------------------------------------------------------------------
    def decision(self, model: nn.Module) -> nn.Module:
        bare = getattr(model, "module", model)
        device = next(bare.parameters()).device
        return ClusterLogits(bare, self._centroids(device), self.sigma2, self.num_classes)

    def batch_clusters(self, r: torch.Tensor, y: torch.Tensor):
        """The batch's clusters of latents r (N, d) with labels y, as the Magnet loss defines them.

        Returns (assign (N,) own-class nearest stored cluster, mu (C·K, d) batch means with gradient —
        stored centroid for a cluster absent from the batch —, d_own (N,) squared distance to the own
        cluster mean, sigma2 (scalar tensor, with gradient), nearest-centroid training accuracy).
        """
        r = r.float()
        stored = self._centroids(r.device)  # (C·K, d)
        cc = self.cluster_class.to(r.device)
        own = cc[None, :] == y[:, None]  # (N, C·K) clusters of the example's class
        with torch.no_grad():
            d_stored = squared_distances(r, stored)
            assign = d_stored.masked_fill(~own, float("inf")).argmin(1)  # (N,) own cluster
            acc = (cc[d_stored.argmin(1)] == y).float().mean()
        counts = torch.bincount(assign, minlength=len(stored)).to(r.dtype)  # (C·K,)
        sums = torch.zeros_like(stored).index_add_(0, assign, r)  # float32 even under autocast (no matmul)
        batch_means = sums / counts.clamp_min(1)[:, None]
        mu = torch.where((counts > 0)[:, None], batch_means, stored)  # absent clusters: stored centroid
        d_own = (r - mu[assign]).pow(2).sum(1)  # (N,)
        sigma2 = (d_own.sum() / max(len(r) - 1, 1)).clamp_min(MIN_SIGMA2)
        return assign, mu, d_own, sigma2, acc

    def magnet_loss(self, r: torch.Tensor, y: torch.Tensor, clusters=None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Mean Magnet loss of latents r (N, d) with labels y, and the nearest-centroid training accuracy.

        `clusters`: `batch_clusters(r, y)` when the caller already has it (QTRADES reuses its means and σ²).
        """
        r = r.float()
        _, mu, d_own, sigma2, acc = clusters if clusters is not None else self.batch_clusters(r, y)
        own = self.cluster_class.to(r.device)[None, :] == y[:, None]  # (N, C·K)
        imp = (-squared_distances(r, mu) / (2 * sigma2)).masked_fill(own, float("-inf"))
        ell = F.relu(d_own / (2 * sigma2) + self.alpha + torch.logsumexp(imp, dim=1))
        return ell.mean(), {"train_acc": acc}

    def loss(self, model, x, y):
        r, anchor = _latent(model, x)
        loss, metrics = self.magnet_loss(r, y)
        if anchor is not None:
            loss = loss + 0.0 * anchor.float().sum()
        return loss, metrics


@METHODS.register("clustr_qtrades")
class ClusTRQTRADES(ClusTR):
    """ClusTR + QTRADES: Magnet loss + λ·CE(p_clean, p(x_adv)), x_adv one step from a random start."""

    name = "clustr_qtrades"
    Settings = ClusTRQTRADESSettings
    adversarial = True

    def __init__(self, settings: Optional[ClusTRQTRADESSettings] = None, *, num_classes: Optional[int] = None,
                 seed: int = 0, eps: float = 0.1, norm: str = "Linf"):
        super().__init__(settings, num_classes=num_classes, seed=seed)
        check_train_budget(eps, norm)
        self.norm = norm
        self.eps = float(eps)
        self.weight = float(self.settings.weight)

    def loss(self, model, x, y):
        with attack_mode(model) as bare:
            decision = self.decision(bare)
            with torch.no_grad():
                clean_logits = decision(x)
            x_adv = train_pgd(decision, x, kl_objective(clean_logits), eps=self.eps, step=1.25 * self.eps, steps=1,
                              norm=self.norm)
        r, anchor = _latent(model, torch.cat([x, x_adv]))  # one forward for both halves
        r_clean, r_adv = r[: len(x)].float(), r[len(x):].float()
        clusters = self.batch_clusters(r_clean, y)
        magnet, metrics = self.magnet_loss(r_clean, y, clusters)
        _, mu, _, sigma2, _ = clusters
        # ClusterLogits' formula with the batch's cluster means and σ² (see the module docstring)
        logits_clean, logits_adv = (cluster_logits(r, mu, sigma2, self.num_classes) for r in (r_clean, r_adv))
        consistency = -(F.softmax(logits_clean, 1) * F.log_softmax(logits_adv, 1)).sum(1).mean()
        loss = magnet + self.weight * consistency
        if anchor is not None:
            loss = loss + 0.0 * anchor.float().sum()
        metrics.update({"magnet": magnet.detach(), "consistency": consistency.detach(),
                        "train_adv_acc": (logits_adv.argmax(1) == y).float().mean().detach()})
        return loss, metrics


def _broadcast_from_rank0(centroids: torch.Tensor, sigma2: torch.Tensor, device: torch.device):
    """Under torch.distributed with several ranks, every rank takes rank 0's clusters (bitwise identical)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return centroids, sigma2
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    c, s = centroids.to(where), sigma2.to(where)
    dist.broadcast(c, 0)
    dist.broadcast(s, 0)
    return c.cpu(), s.cpu()
