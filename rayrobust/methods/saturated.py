"""`saturated`: a gradient-masking CONTROL for the evaluation and the search, never a defense.

Ordinary cross-entropy training; the decision function multiplies the logits by `scale` (`train.method_args.saturated.scale`)
(default 1000). This is the failure mode of defensive distillation (Carlini & Wagner 2016,
"Defensive Distillation is Not Robust to Adversarial Examples"): with large logits the softmax
saturates, the cross-entropy input gradient of every confidently classified point underflows to
exactly zero, and PGD on cross-entropy stalls (its "robust accuracy" stays near the clean one),
while a scale-invariant loss (the DLR loss of APGD-T) still breaks the model. The predictions are
those of the unscaled classifier, so the only thing the scale changes is what a weak attack sees.

rayrobust uses it to show that the sanity flags (`zero_gradients`) and the search objective
(APGD-CE + APGD-T) are not fooled; the scale is our choice of a large enough factor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import METHODS, Method, MethodSettings


class ScaledLogits(nn.Module):
    """`model(x) * scale`: same predictions, saturated softmax."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model = model
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.scale


@dataclass
class SaturatedSettings(MethodSettings):
    scale: float = 1000.0  # decision logits x this factor (gradient masking on purpose)

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ConfigError(f"scale={self.scale} must be > 0 (e.g. 1000)")


@METHODS.register("saturated")
class Saturated(Method):
    """Cross-entropy training; decision logits multiplied by `scale` (a masking control)."""

    name = "saturated"
    Settings = SaturatedSettings

    def __init__(self, settings: Optional[SaturatedSettings] = None):
        super().__init__(settings)
        self.scale = float(self.settings.scale)

    def loss(self, model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_acc": (logits.argmax(1) == y).float().mean().detach()}

    def decision(self, model: nn.Module) -> nn.Module:
        return ScaledLogits(model, self.scale)
