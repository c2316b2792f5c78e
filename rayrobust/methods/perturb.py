"""Training-time L-inf and L2 perturbations (the hot path of adversarial training).

Kept minimal on purpose: these run k+1 forward/backward passes per training step. Evaluation uses
the fuller attacks in `rayrobust.attacks`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor], torch.Tensor]  # adversarial logits -> scalar loss to maximise


NORMS = ("Linf", "L2")


def _flat_l2(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norms of (N, ...) as (N, 1, 1, 1)-broadcastable (N, 1, ...) tensor."""
    return t.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


@torch.enable_grad()
def train_pgd(
    model: nn.Module,
    x: torch.Tensor,  # (N,C,H,W) in [0,1]
    loss_fn: LossFn,
    *,
    eps: float,  # budget in [0,1] pixel units, in `norm`
    step: float,  # step size in [0,1] pixel units (L-inf: per pixel; L2: length of the step)
    steps: int,
    norm: str = "Linf",
    random_start: bool = True,
    weight: Optional[torch.Tensor] = None,  # per-pixel weights in [0,1] (SPAT), broadcast to x
) -> torch.Tensor:
    """Maximise `loss_fn(model(x + delta))` over the `norm` eps-ball intersected with [0,1].

    L-inf: signed-gradient ascent, projection by clipping (Madry et al. 2018). L2: steps along the
    gradient normalised to length `step`, projection by rescaling onto the ball; the random start is a
    Gaussian direction scaled to a length uniform in [0, eps] (as Rice et al. 2020's L2 training code).
    `weight` shapes the start and every step per pixel (L2: before the normalisation), and the
    projection is onto the full ball.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is unknown; use 'Linf' or 'L2'")
    w = 1.0 if weight is None else weight
    if not random_start:
        delta = torch.zeros_like(x)
    elif norm == "Linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps * w
    else:
        direction = torch.randn_like(x) * w
        radius = torch.rand(len(x), device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1))) * eps
        delta = direction / _flat_l2(direction) * radius
    delta = (x + delta).clamp_(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta))
        (grad,) = torch.autograd.grad(loss, delta)
        if norm == "Linf":
            delta = delta.detach() + step * w * grad.sign()
            delta = delta.clamp_(-eps, eps)
        else:
            g = grad * w
            delta = delta.detach() + step * g / _flat_l2(g)
            delta = delta * (eps / _flat_l2(delta)).clamp(max=1.0)
        delta = (x + delta).clamp_(0, 1) - x
    return (x + delta).detach()


def linf_pgd(model: nn.Module, x: torch.Tensor, loss_fn: LossFn, **kwargs) -> torch.Tensor:
    """`train_pgd` in L-inf (the `norm` keyword, when given, wins)."""
    kwargs.setdefault("norm", "Linf")
    return train_pgd(model, x, loss_fn, **kwargs)


def ce_objective(y: torch.Tensor) -> LossFn:
    return lambda logits: F.cross_entropy(logits, y)


def kl_objective(clean_logits: torch.Tensor) -> LossFn:
    p_clean = F.softmax(clean_logits.detach(), dim=1)
    return lambda logits: F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="batchmean")


class attack_mode:
    """Generate training attacks on the bare module in eval mode, then restore the mode.

    Eval mode keeps BatchNorm statistics those of the clean training batches; the bare module
    (unwrapped from DistributedDataParallel) keeps attack passes out of gradient synchronisation.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return getattr(self.model, "module", self.model)

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        return False


def check_train_budget(eps: float, norm: str) -> None:
    """A ConfigError naming the fix when (eps, norm) is not a training budget: L-inf eps in (0, 1], L2 eps > 0
    (bounded by the input's diameter, checked where the images' shape is known)."""
    from ..errors import ConfigError

    if norm not in NORMS:
        raise ConfigError(f"train.norm={norm!r} is unknown; use 'Linf' or 'L2'")
    if norm == "Linf" and not 0 < eps <= 1:
        raise ConfigError(f"eps={eps} is outside (0, 1]: L-inf budgets are in [0,1] pixel units (e.g. 8/255)")
    if norm == "L2" and not eps > 0:
        raise ConfigError(f"eps={eps} must be > 0: an L2 budget in [0,1] pixel units (e.g. 0.5 on CIFAR-10)")
