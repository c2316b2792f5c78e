"""Training-time L-inf perturbations (the hot path of adversarial training).

Kept minimal on purpose: these run k+1 forward/backward passes per training step. Evaluation uses
the fuller attacks in `rayrobust.attacks`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor], torch.Tensor]  # adversarial logits -> scalar loss to maximise


@torch.enable_grad()
def linf_pgd(
    model: nn.Module,
    x: torch.Tensor,  # (N,C,H,W) in [0,1]
    loss_fn: LossFn,
    *,
    eps: float,  # L-inf budget in [0,1] pixel units
    step: float,  # step size in [0,1] pixel units
    steps: int,
    random_start: bool = True,
    weight: Optional[torch.Tensor] = None,  # per-pixel budget weights in [0,1] (SPAT), broadcast to x
) -> torch.Tensor:
    """Maximise `loss_fn(model(x + delta))` over the eps-ball by signed-gradient ascent."""
    w = 1.0 if weight is None else weight
    if random_start:
        delta = (torch.rand_like(x) * 2 - 1) * eps * w
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp_(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta))
        (grad,) = torch.autograd.grad(loss, delta)
        delta = delta.detach() + step * w * grad.sign()
        delta = delta.clamp_(-eps, eps)
        delta = (x + delta).clamp_(0, 1) - x
    return (x + delta).detach()


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
