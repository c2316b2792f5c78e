"""DRP — deep repulsive prototypes (docs/methods.md §3; after Serban, Poll, Visser).

Fixed class prototypes P ∈ R^{C×D} on the unit sphere, generated once, deterministically from a
seed, to be far apart (`make_prototypes`). The model outputs D dims; with f̂ = f(x)/‖f(x)‖ the loss is

    ‖f̂ − p_y‖ + β · Σ_{c≠y} max(0, m − (‖f̂ − p_c‖ − ‖f̂ − p_y‖))

(m: `margin`, β: `beta`, settings of `DRPSettings`). The decision function, and what every attack sees, is
`PrototypeLogits`: scale · ⟨f̂, p_c⟩, smooth logits whose argmax is the nearest prototype (on the
sphere ‖f̂ − p‖² = 2 − 2⟨f̂, p⟩), never the prototype distance alone.

Variants: `drp` (clean training, the paper) and `drp_at` (the prototype loss on PGD examples). Our
choice for `drp_at`'s training attack: PGD (random start, step 2.5·eps/k) maximising cross-entropy
on the decision logits — the same function the evaluation attacks (APGD-CE/-T) target — rather
than the prototype loss, whose hinge terms have flat regions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import METHODS, Method, MethodSettings
from .perturb import attack_mode, ce_objective, check_train_budget, train_pgd


def simplex_distance(num_classes: int) -> float:
    """Pairwise distance of the regular simplex on the unit sphere: the largest possible minimum."""
    return math.sqrt(2.0 * num_classes / (num_classes - 1))


def pairwise_distances(p: torch.Tensor) -> torch.Tensor:
    """The C(C−1)/2 distances ‖p_i − p_j‖, i < j."""
    i, j = torch.triu_indices(len(p), len(p), offset=1)
    return (p[i] - p[j]).norm(dim=1)


def make_prototypes(num_classes: int, dim: int = 100, *, seed: int = 0, margin: Optional[float] = None,
                    steps: int = 500, lr: float = 0.05, temperature: float = 0.05) -> Tuple[torch.Tensor, float]:
    """Unit-norm prototypes (num_classes, dim) and their achieved minimum pairwise distance.

    Minimises Σ_{i<j} max(0, m_p − ‖p_i − p_j‖)² + τ·logsumexp_{i<j}(⟨p_i, p_j⟩/τ) by Adam with a
    projection back to the sphere after every step, from a seeded Gaussian start (float64, CPU, own
    generator: the same seed gives the same prototypes and the global RNG is untouched).
    m_p defaults to the regular-simplex distance √(2C/(C−1)), the best achievable.
    """
    if num_classes < 2:
        raise ConfigError(f"DRP needs at least 2 classes, got {num_classes}")
    if dim < num_classes - 1:
        raise ConfigError(f"DRP prototype dim={dim} must be >= num_classes-1={num_classes - 1} to separate the classes")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a (C, D) problem: threads only add overhead (and contention on busy hosts)
    try:
        return _make_prototypes(num_classes, dim, seed, margin, steps, lr, temperature)
    finally:
        torch.set_num_threads(threads)


def _make_prototypes(num_classes, dim, seed, margin, steps, lr, temperature) -> Tuple[torch.Tensor, float]:
    m_p = simplex_distance(num_classes) if margin is None else margin
    g = torch.Generator().manual_seed(seed)
    p = F.normalize(torch.randn(num_classes, dim, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    opt = torch.optim.Adam([p], lr=lr)
    i, j = torch.triu_indices(num_classes, num_classes, offset=1)
    for _ in range(steps):
        q = F.normalize(p, dim=1)
        d = (q[i] - q[j]).norm(dim=1)
        cos = (q[i] * q[j]).sum(1)
        loss = F.relu(m_p - d).pow(2).sum() + temperature * torch.logsumexp(cos / temperature, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            p.copy_(F.normalize(p, dim=1))
    protos = F.normalize(p.detach(), dim=1).float()
    return protos, pairwise_distances(protos).min().item()


class PrototypeLogits(nn.Module):
    """The attackable decision function of a prototype model: scale · ⟨f(x)/‖f(x)‖, p_c⟩ per class."""

    def __init__(self, model: nn.Module, prototypes: torch.Tensor, scale: float = 10.0):
        super().__init__()
        self.model = model
        self.register_buffer("prototypes", prototypes.detach().clone())
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.model(x).float(), dim=1)
        return self.scale * z @ self.prototypes.t()


@dataclass
class DRPSettings(MethodSettings):
    margin: float = 0.5  # repulsion margin m between the true and every wrong prototype distance (Tune: 0.05..2, log)
    beta: float = 1.0  # weight of the repulsion-margin term
    dim: int = 100  # prototype dimension D (the model's output width); >= classes - 1
    scale: float = 10.0  # the decision logits' scale (-scale x distance to each prototype)

    def __post_init__(self) -> None:
        if not self.margin > 0:
            raise ConfigError(f"margin={self.margin} must be > 0 "
                              "(the margin between the nearest wrong prototype and the true one; e.g. 0.5)")
        if not self.beta >= 0:
            raise ConfigError(f"beta={self.beta} must be >= 0 (weight of the repulsion-margin term; e.g. 1)")
        if not self.dim >= 1:
            raise ConfigError(f"dim={self.dim} must be >= 1 (100 for 10 classes)")
        if not self.scale > 0:
            raise ConfigError(f"scale={self.scale} must be > 0 (e.g. 10)")


@METHODS.register("drp")
class DRP(Method):
    """Deep repulsive prototypes, clean training."""

    name = "drp"
    Settings = DRPSettings

    def __init__(self, settings: Optional[DRPSettings] = None, *, num_classes: Optional[int] = None, seed: int = 0):
        super().__init__(settings)
        self.dim = int(self.settings.dim)
        self.margin = float(self.settings.margin)
        self.beta = float(self.settings.beta)
        self.scale = float(self.settings.scale)
        self.seed = int(seed)
        self.prototypes: Optional[torch.Tensor] = None  # (C, D), unit rows, on CPU
        self.min_distance: Optional[float] = None  # achieved minimum pairwise prototype distance
        self._cache: Dict[torch.device, torch.Tensor] = {}
        if num_classes is not None:
            self.init_prototypes(int(num_classes))

    def init_prototypes(self, num_classes: int) -> torch.Tensor:
        self._set(*make_prototypes(num_classes, self.dim, seed=self.seed))
        return self.prototypes

    def _set(self, prototypes: torch.Tensor, min_distance: float) -> None:
        self.prototypes = prototypes.detach().float().cpu().contiguous()
        self.dim = self.prototypes.shape[1]
        self.min_distance = float(min_distance)
        self._cache = {}

    def _protos(self, device: torch.device) -> torch.Tensor:
        if self.prototypes is None:
            raise ConfigError("DRP has no prototypes: create it with num_classes=..., or load_state_dict() "
                              "the method_state of a DRP checkpoint")
        if device not in self._cache:
            self._cache[device] = self.prototypes.to(device)
        return self._cache[device]

    def output_dim(self, num_classes: int) -> int:
        if self.prototypes is None:
            self.init_prototypes(num_classes)
        elif len(self.prototypes) != num_classes:
            raise ConfigError(f"DRP prototypes are for {len(self.prototypes)} classes, the data has {num_classes}")
        return self.dim

    def state_dict(self) -> Dict[str, torch.Tensor]:
        if self.prototypes is None:
            return {}
        return {"prototypes": self.prototypes.clone(), "min_distance": torch.tensor(self.min_distance)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if "prototypes" not in state:
            raise ConfigError("DRP method state has no 'prototypes'")
        p = state["prototypes"]
        md = state.get("min_distance")
        self._set(p, pairwise_distances(p.float()).min().item() if md is None else float(md))

    def decision(self, model: nn.Module) -> nn.Module:
        device = next(model.parameters()).device
        return PrototypeLogits(model, self._protos(device), self.scale)

    def prototype_loss(self, out: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean DRP loss, decision logits) for model outputs `out` (N, D) and labels y."""
        p = self._protos(out.device)
        z = F.normalize(out.float(), dim=1)
        # ‖z − p_c‖ for unit z, p: sqrt(2 − 2⟨z, p_c⟩), clamped away from 0 for a finite gradient
        cos = z @ p.t()
        dist = (2 - 2 * cos).clamp_min(1e-8).sqrt()  # (N, C)
        d_true = dist.gather(1, y[:, None])  # (N, 1)
        hinge = F.relu(self.margin - (dist - d_true))
        hinge = hinge.masked_fill(F.one_hot(y, len(p)).bool(), 0.0)  # c ≠ y only
        loss = (d_true.squeeze(1) + self.beta * hinge.sum(1)).mean()
        return loss, self.scale * cos

    def loss(self, model, x, y):
        loss, logits = self.prototype_loss(model(x), y)
        return loss, {"train_acc": (logits.argmax(1) == y).float().mean().detach()}


@METHODS.register("drp_at")
class DRPAT(DRP):
    """DRP + PGD-AT: the prototype loss on PGD-k examples (PGD maximises CE on the decision logits)."""

    name = "drp_at"
    adversarial = True

    def __init__(self, settings: Optional[DRPSettings] = None, *, num_classes: Optional[int] = None, seed: int = 0,
                 eps: float = 0.1, steps: int = 7, norm: str = "Linf"):
        super().__init__(settings, num_classes=num_classes, seed=seed)
        check_train_budget(eps, norm)
        if steps < 1:
            raise ConfigError(f"steps={steps} must be >= 1")
        self.eps = eps
        self.steps = steps
        self.norm = norm

    def loss(self, model, x, y):
        with attack_mode(model) as bare:
            x_adv = train_pgd(self.decision(bare), x, ce_objective(y), eps=self.eps,
                              step=2.5 * self.eps / self.steps, steps=self.steps, norm=self.norm)
        loss, logits = self.prototype_loss(model(x_adv), y)
        return loss, {"train_adv_acc": (logits.argmax(1) == y).float().mean().detach()}
