"""SPAT-style training — semantics-preserving adversarial training (docs/methods.md §4; after Lee, Lee, Lee).

Only the idea of the paper is public; this is our operational version ("SPAT-style"). Training
adversarial examples put their budget on pixels *shared among all classes*: PGD-AT where every step
is α · w ⊙ sign(∇) and the random start is scaled by w, projected to the full eps-ball, with a
per-pixel weight map w ∈ [w_min, 1]:

- `fisher` (default, data-level, computed once by `fit` from the training data): per-pixel Fisher
  ratio F = between-class variance of the class-mean images / mean within-class variance,
  w = 1 − (1 − w_min) · normalise(F) (normalise: min-max to [0, 1]). Pixels whose value does not tell
  the classes apart get the full budget.
- `saliency` (per sample): with g_c = |∂z_c/∂x| for every class logit z_c, a pixel's shared score is
  min_c g_c / max_c g_c; w = w_min + (1 − w_min) · normalise(score) per sample.

Evaluation uses the unmasked threat model: the decision function is the model itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import METHODS, MethodSettings
from .baselines import _Adversarial, _accuracy
from .perturb import attack_mode, ce_objective, train_pgd

SPAT_WEIGHTS = ("fisher", "saliency")


def _minmax(t: torch.Tensor, dims) -> torch.Tensor:
    lo, hi = t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)
    return (t - lo) / (hi - lo).clamp_min(1e-12)


def fisher_ratio(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel Fisher ratio (C,H,W): between-class variance of class means / mean within-class variance."""
    shape = x.shape[1:]
    x = x.flatten(1)
    classes = torch.unique(y)
    stats = []  # (prior, class mean, class variance) per class, one class copy at a time (float32 data, float64 sums)
    for c in classes:
        xc = x[y == c]
        var, mean = torch.var_mean(xc, dim=0, unbiased=False)
        stats.append((len(xc) / len(x), mean.double(), var.double()))
    overall = sum(prior * mean for prior, mean, _ in stats)
    between = sum(prior * (mean - overall) ** 2 for prior, mean, _ in stats)
    within = sum(prior * var for prior, _, var in stats)
    # Variance floor (1e-3 of the mean within-class variance): a nearly constant pixel cannot take
    # the whole range of the min-max normalisation; a constant one (between = 0) gets ratio 0.
    floor = max(1e-3 * within.mean().item(), 1e-12)
    ratio = between / within.clamp_min(floor)
    return ratio.float().view(shape)


def fisher_weights(x: torch.Tensor, y: torch.Tensor, w_min: float) -> torch.Tensor:
    """w = 1 − (1 − w_min)·normalise(F), shape (1,C,H,W): low-Fisher (shared) pixels get budget 1."""
    ratio = fisher_ratio(x, y).unsqueeze(0)
    return 1 - (1 - w_min) * _minmax(ratio, dims=tuple(range(1, ratio.ndim)))


@torch.enable_grad()
def saliency_weights(model: torch.nn.Module, x: torch.Tensor, w_min: float, num_classes: Optional[int] = None) -> torch.Tensor:
    """Per-sample w (N,C,H,W) from min_c|∂z_c/∂x| / max_c|∂z_c/∂x| (model in eval mode: samples independent)."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    n_cls = logits.shape[1] if num_classes is None else num_classes
    lo = hi = None
    for c in range(n_cls):
        (g,) = torch.autograd.grad(logits[:, c].sum(), x, retain_graph=c + 1 < n_cls)
        g = g.abs()
        lo = g if lo is None else torch.minimum(lo, g)
        hi = g if hi is None else torch.maximum(hi, g)
    score = lo / hi.clamp_min(1e-12)
    dims = tuple(range(1, x.ndim))
    return (w_min + (1 - w_min) * _minmax(score, dims)).detach()


@dataclass
class SPATSettings(MethodSettings):
    weights: str = "fisher"  # the shared-pixel weight map: fisher (data-level) or saliency (per sample)
    w_min: float = 0.5  # budget fraction of the most class-specific pixels, in (0, 1]

    def __post_init__(self) -> None:
        if self.weights not in SPAT_WEIGHTS:
            raise ConfigError(f"weights={self.weights!r} must be one of: {', '.join(SPAT_WEIGHTS)}")
        if not 0 < self.w_min <= 1:
            raise ConfigError(f"w_min={self.w_min} must be in (0, 1] (the budget fraction of the most "
                              "class-specific pixels; e.g. 0.5)")


@METHODS.register("spat")
class SPAT(_Adversarial):
    """SPAT-style PGD-AT: CE on PGD-k examples whose steps and random start are scaled by a shared-pixel map."""

    name = "spat"
    Settings = SPATSettings

    def __init__(self, settings: Optional[SPATSettings] = None, *, eps: float = 0.1, steps: int = 7,
                 norm: str = "Linf"):
        super().__init__(settings, eps=eps, steps=steps, norm=norm)
        self.weights = self.settings.weights
        self.w_min = float(self.settings.w_min)
        self.weight: Optional[torch.Tensor] = None  # fisher map (1,C,H,W), on CPU
        self._cache: Dict[torch.device, torch.Tensor] = {}

    def fit(self, x_train: torch.Tensor, y_train: torch.Tensor) -> None:
        if self.weights == "fisher":
            self.weight = fisher_weights(x_train, y_train, self.w_min).cpu()
            self._cache = {}

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {} if self.weight is None else {"weight": self.weight.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if "weight" in state:
            self.weight = state["weight"].detach().float().cpu()
            self._cache = {}

    def _weight(self, bare: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.weights == "saliency":
            return saliency_weights(bare, x, self.w_min)
        if self.weight is None:
            raise ConfigError("SPAT fisher weights are not computed: call method.fit(x_train, y_train) before training")
        if x.device not in self._cache:
            self._cache[x.device] = self.weight.to(x.device)
        return self._cache[x.device]

    def loss(self, model, x, y):
        with attack_mode(model) as bare:
            w = self._weight(bare, x)
            x_adv = train_pgd(bare, x, ce_objective(y), eps=self.eps, step=2.5 * self.eps / self.steps,
                              steps=self.steps, norm=self.norm, weight=w)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_adv_acc": _accuracy(logits, y), "spat_mean_w": w.mean().detach()}
