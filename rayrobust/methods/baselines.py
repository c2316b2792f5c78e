"""Baselines every claim is measured against (docs/methods.md §0.2): standard, PGD-AT, TRADES, FGSM-RS."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import METHODS, Method, MethodSettings
from .perturb import attack_mode, ce_objective, check_train_budget, kl_objective, train_pgd


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of logits (N, classes) whose argmax is y (N,), a 0-d tensor on their device (no host sync)."""
    return (logits.argmax(1) == y).float().mean().detach()


class _Adversarial(Method):
    adversarial = True

    def __init__(self, settings: Optional[MethodSettings] = None, *, eps: float = 0.1, steps: int = 7,
                 norm: str = "Linf", attack_step: Optional[float] = None):
        super().__init__(settings)
        check_train_budget(eps, norm)
        if steps < 1:
            raise ConfigError(f"steps={steps} must be >= 1")
        if attack_step is not None and not attack_step > 0:
            raise ConfigError(f"attack_step={attack_step} must be > 0, or null for 2.5*eps/steps")
        self.eps = eps  # budget in [0,1] pixel units, in `norm`
        self.steps = steps
        self.norm = norm
        # PGD step size: the given one, else Madry et al.'s 2.5*eps/steps (2/255 for PGD-10 at 8/255)
        self.step = float(attack_step) if attack_step is not None else 2.5 * eps / steps


@METHODS.register("standard")
class Standard(Method):
    """Cross-entropy on clean data."""

    name = "standard"

    def loss(self, model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_acc": _accuracy(logits, y)}


@METHODS.register("pgd_at")
class PGDAT(_Adversarial):
    """Madry et al. 2018: CE on PGD-k examples, random start, step 2.5*eps/k (or train.attack_step)."""

    name = "pgd_at"

    def loss(self, model, x, y):
        with attack_mode(model) as bare:
            x_adv = train_pgd(bare, x, ce_objective(y), eps=self.eps, step=self.step, steps=self.steps, norm=self.norm)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_adv_acc": _accuracy(logits, y)}


@dataclass
class TRADESSettings(MethodSettings):
    beta: float = 6.0  # weight of the KL term (Zhang et al.: 6)

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ConfigError(f"beta={self.beta} must be >= 0 (the KL weight; 6 in Zhang et al.)")


@METHODS.register("trades")
class TRADES(_Adversarial):
    """Zhang et al. 2019: CE(clean) + beta * KL(p(x) || p(x_adv)), x_adv from k-step PGD on the KL."""

    name = "trades"
    Settings = TRADESSettings

    def __init__(self, settings: Optional[TRADESSettings] = None, *, eps: float = 0.1, steps: int = 7,
                 norm: str = "Linf", attack_step: Optional[float] = None):
        super().__init__(settings, eps=eps, steps=steps, norm=norm, attack_step=attack_step)
        self.beta = float(self.settings.beta)

    def loss(self, model, x, y):
        with attack_mode(model) as bare:
            clean_eval = bare(x).detach()
            x_adv = train_pgd(
                bare, x, kl_objective(clean_eval), eps=self.eps, step=self.step,
                steps=self.steps, norm=self.norm, random_start=True,
            )
        logits = model(torch.cat([x, x_adv]))  # (2N, classes): one pass for both terms
        clean, adv = logits.chunk(2)
        kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        loss = F.cross_entropy(clean, y) + self.beta * kl
        return loss, {"train_acc": _accuracy(clean, y), "train_adv_acc": _accuracy(adv, y)}


@METHODS.register("fgsm_rs")
class FGSMRS(_Adversarial):
    """Wong et al. 2020: one FGSM step of 1.25*eps from a uniform random start."""

    name = "fgsm_rs"

    def __init__(self, settings: Optional[MethodSettings] = None, *, eps: float = 0.1, norm: str = "Linf"):
        super().__init__(settings, eps=eps, steps=1, norm=norm)

    def loss(self, model, x, y):
        with attack_mode(model) as bare:
            x_adv = train_pgd(bare, x, ce_objective(y), eps=self.eps, step=1.25 * self.eps, steps=1,
                              norm=self.norm)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_adv_acc": _accuracy(logits, y)}
