"""FGSM and PGD (L∞ and L2) on cross-entropy or TRADES' KL, plus accuracy helpers.

Every attack has the same constructor and `perturb(x, y) -> x_adv` (after auto-attack's convention):

    >>> atk = PGD(model, eps=0.1, steps=10, seed=0)   # eps in [0,1] pixel units
    >>> x_adv = atk.perturb(x, y)                      # same shape/device as x, in [0,1]

The attack never changes `model.training` nor the parameters' `requires_grad`: gradients are taken
with `torch.autograd.grad` w.r.t. the input only. The caller chooses train/eval mode (PGD-AT usually
attacks in eval mode; BatchNorm in train mode would update its running statistics on every step).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# ---------------------------------------------------------------------------------------------
# small model utilities shared by autoattack.py and checks.py


def model_device(model: nn.Module, fallback: Optional[torch.device] = None) -> torch.device:
    """The device of the model's first parameter or buffer (else `fallback`, else CPU)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return fallback if fallback is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def frozen_params(model: nn.Module) -> Iterator[nn.Module]:
    """Turn off requires_grad of the parameters (attacks that call .backward() then leave no
    .grad behind and build smaller graphs); restore each flag afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# norms: random start, ascent step, projection. Per-example, x of shape (N, ...).


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped (N, 1, 1, ...) to broadcast against t."""
    n = t.flatten(1).norm(dim=1)
    return n.view(-1, *([1] * (t.dim() - 1)))


def _linf_start(x, eps, gen):
    u = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)  # drawn on the CPU: the same on every device
    return x + eps * (2 * u - 1)  # uniform in the L∞ ball


def _linf_step(x_adv, grad, step):
    return x_adv + step * grad.sign()


def _linf_project(x_adv, x, eps):
    return torch.min(torch.max(x_adv, x - eps), x + eps)


def _l2_start(x, eps, gen):
    d = x[0].numel()
    direction = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)  # CPU draws, as in _linf_start
    direction = direction / (_flat_norm(direction) + 1e-12)
    u = torch.rand((x.shape[0],), generator=gen, dtype=x.dtype).to(x.device)
    radius = eps * u.pow(1.0 / d)  # uniform in the L2 ball (volume-weighted radius)
    return x + direction * radius.view(-1, *([1] * (x.dim() - 1)))


def _l2_step(x_adv, grad, step):
    return x_adv + step * grad / (_flat_norm(grad) + 1e-12)


def _l2_project(x_adv, x, eps):
    delta = x_adv - x
    scale = torch.clamp(eps / (_flat_norm(delta) + 1e-12), max=1.0)
    return x + delta * scale


_NORMS: Dict[str, tuple] = {
    "Linf": (_linf_start, _linf_step, _linf_project),
    "L2": (_l2_start, _l2_step, _l2_project),
}


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example size of a perturbation in the given norm, shape (N,)."""
    flat = delta.flatten(1)
    sizes = {"Linf": lambda: flat.abs().amax(dim=1), "L2": lambda: flat.norm(dim=1),
             "L1": lambda: flat.abs().sum(dim=1)}
    return sizes[norm]()


# ---------------------------------------------------------------------------------------------
# losses to maximise, per example (N,)


def _ce_loss(logits, y, clean_logits):
    return F.cross_entropy(logits, y, reduction="none")


def _kl_loss(logits, y, clean_logits):
    # KL(p(x) || p(x_adv)) as in TRADES; clean_logits are fixed (no gradient)
    p_clean = F.softmax(clean_logits, dim=1)
    return (p_clean * (F.log_softmax(clean_logits, dim=1) - F.log_softmax(logits, dim=1))).sum(1)


_LOSSES: Dict[str, Callable] = {"ce": _ce_loss, "kl": _kl_loss}


def input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x; zeros where the model cut the graph (detach, no_grad, integer ops)."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return grad if grad is not None else torch.zeros_like(x)


# ---------------------------------------------------------------------------------------------


def _validate(eps, norm, steps, restarts, step_size, loss, random_start, eot=1) -> None:
    if norm not in _NORMS:
        raise ConfigError(f"attack norm={norm!r} is not supported; use one of {sorted(_NORMS)}")
    eps_ok = 0 < eps <= 1 if norm == "Linf" else eps > 0
    if not eps_ok:
        rng = "(0, 1]" if norm == "Linf" else "(0, inf)"
        raise ConfigError(f"attack eps={eps!r} is out of range; {norm} eps must be in {rng} "
                          "(pixel units of [0,1] images, e.g. 8/255 or 0.1)")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"attack steps={steps!r} is invalid; use an integer >= 1")
    if not (isinstance(restarts, int) and restarts >= 1):
        raise ConfigError(f"attack restarts={restarts!r} is invalid; use an integer >= 1")
    if not (isinstance(eot, int) and eot >= 1):
        raise ConfigError(f"attack eot={eot!r} is invalid; use an integer >= 1 (gradient samples per step)")
    if step_size is not None and not step_size > 0:
        raise ConfigError(f"attack step_size={step_size!r} must be > 0 (or None for the default)")
    if loss not in _LOSSES:
        raise ConfigError(f"attack loss={loss!r} is not supported; use one of {sorted(_LOSSES)}")
    if loss == "kl" and not random_start:
        raise ConfigError("attack loss='kl' has zero gradient at the clean input; "
                          "set random_start=True")


class Attack:
    """Iterated gradient-sign (L∞) / normalised-gradient (L2) ascent with projection.

    eps: budget in [0,1] pixel units. step_size: per step, default 2.5*eps/steps (Madry et al.).
    restarts: per example, the first restart that fools the model wins, else the highest loss.
    eot: gradient samples averaged per step (expectation over transformation, for a randomized model;
    1, the default, is one gradient as usual).
    seed: seeds a private CPU torch.Generator (the global RNG is untouched); it fixes the sequence of
    random starts over successive `perturb` calls of this object, and they are the same on every device
    (drawn on the CPU, then moved), so CPU and GPU runs differ only by float rounding.
    """

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", steps: int = 10,
                 restarts: int = 1, step_size: Optional[float] = None, random_start: bool = True,
                 seed: int = 0, loss: str = "ce", eot: int = 1):
        _validate(eps, norm, steps, restarts, step_size, loss, random_start, eot)
        self.model, self.eps, self.norm = model, eps, norm
        self.steps, self.restarts, self.eot = steps, restarts, eot
        default_step = self._default_step(eps, steps, random_start)
        self.step_size = step_size if step_size is not None else default_step
        self.random_start, self.seed, self.loss = random_start, seed, loss
        self._start, self._step, self._project = _NORMS[norm]
        self._loss_fn = _LOSSES[loss]
        self._gen: Optional[torch.Generator] = None

    @staticmethod
    def _default_step(eps, steps, random_start):
        return 2.5 * eps / steps

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps}, norm={self.norm}, steps={self.steps}, "
                f"restarts={self.restarts}, step_size={self.step_size:.4g}, "
                f"random_start={self.random_start}, loss={self.loss}, seed={self.seed})")

    def _generator(self) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        return self._gen

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) in [0,1], y (N,) labels -> x_adv, same shape, in [0,1] and in the ball."""
        x, y = x.detach(), y.detach()
        with torch.no_grad():
            clean_logits = self.model(x) if self.loss == "kl" else None
        best, best_loss, fooled = self._single_run(x, y, clean_logits)
        for _ in range(self.restarts - 1):
            todo = (~fooled).nonzero().squeeze(1)  # (M,) indices still robust
            if todo.numel() == 0:
                break
            cl = clean_logits[todo] if clean_logits is not None else None
            adv, loss, fool = self._single_run(x[todo], y[todo], cl)
            take = fool | (loss > best_loss[todo])
            best[todo[take]] = adv[take]
            best_loss[todo[take]] = loss[take]
            fooled[todo[fool]] = True
        return best

    def _single_run(self, x, y, clean_logits):
        """One restart: returns (x_adv, per-example loss, per-example fooled)."""
        x_adv = x
        if self.random_start:
            x_adv = self._start(x, self.eps, self._generator()).clamp(0, 1)
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            loss = self._loss_fn(self.model(x_adv), y, clean_logits).sum()
            grad = input_grad(loss, x_adv)
            if self.eot > 1:  # EOT: the mean gradient over eot forward passes
                for _ in range(self.eot - 1):
                    grad = grad + input_grad(self._loss_fn(self.model(x_adv), y, clean_logits).sum(), x_adv)
                grad = grad / self.eot
            with torch.no_grad():
                x_adv = self._project(self._step(x_adv, grad, self.step_size), x, self.eps)
                x_adv = x_adv.clamp(0, 1)
        with torch.no_grad():
            logits = self.model(x_adv)
            loss = self._loss_fn(logits, y, clean_logits)
            fooled = logits.argmax(1) != y
        return x_adv.detach(), loss, fooled


class FGSM(Attack):
    """One signed-gradient step (Goodfellow et al.). Default: no random start and step = eps;
    with random_start=True it is FGSM-RS (Wong et al. 2020), default step 1.25*eps."""

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", steps: int = 1,
                 restarts: int = 1, step_size: Optional[float] = None, random_start: bool = False,
                 seed: int = 0, loss: str = "ce"):
        if steps != 1:
            raise ConfigError(f"fgsm takes exactly one step (got steps={steps!r}); "
                              "use attack 'pgd' for several steps")
        super().__init__(model, eps=eps, norm=norm, steps=1, restarts=restarts,
                         step_size=step_size, random_start=random_start, seed=seed, loss=loss)

    @staticmethod
    def _default_step(eps, steps, random_start):
        return 1.25 * eps if random_start else eps


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018): random start, step 2.5*eps/steps."""


# ---------------------------------------------------------------------------------------------


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of x classified as y, in the model's current mode, batches on the model's device."""
    if len(x) == 0:
        return float("nan")
    device = model_device(model, x.device)
    correct = torch.zeros((), dtype=torch.int64, device=device)  # counted on the device, read once
    with torch.no_grad():
        for s in _batches(len(x), batch_size):
            pred = model(x[s].to(device)).argmax(1)
            correct += (pred == y[s].to(device)).sum()
    return correct.item() / len(x)


def robust_accuracy(model: nn.Module, attack: Attack, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 500) -> float:
    """Accuracy on attack.perturb(x, y), batch by batch on the model's device."""
    if len(x) == 0:
        return float("nan")
    device = model_device(model, x.device)
    correct = torch.zeros((), dtype=torch.int64, device=device)  # counted on the device, read once
    for s in _batches(len(x), batch_size):
        xb, yb = x[s].to(device), y[s].to(device)
        x_adv = attack.perturb(xb, yb)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == yb).sum()
    return correct.item() / len(x)
