"""Sanity checks of docs/evaluation.md §4 (after Carlini et al. 2019 and AutoAttack's checks.py).

Each check returns a `Flag`; `passed=False` means the flag is raised and must be shown next to the
number it qualifies. Number-level checks take accuracies (fractions in [0,1]); model-level checks
take the model. `run_model_checks` runs the model-level ones plus cheap PGD probes:

    >>> flags, measured = run_model_checks(model, x, y, eps=0.1)
    >>> failed(flags)          # [] when every check is quiet
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .pgd import PGD, accuracy, eval_mode, input_grad, model_device, robust_accuracy

ACC_SLACK = 1e-9  # float slack when comparing accuracies that should be ordered
MANY_RESTARTS = 2  # restarts of the 5x-steps PGD probe (the few-steps probe has 1)
LARGE_EPS = {"Linf": 0.5}  # reaches the all-grey image from any input; L2: 0.5*sqrt(d), below


@dataclass
class Flag:
    name: str     # e.g. "robust_above_clean"
    passed: bool  # False: the flag is raised
    detail: str   # what was measured, readable in a table cell

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


def failed(flags: List[Flag]) -> List[str]:
    """Names of the raised flags."""
    return [f.name for f in flags if not f.passed]


# --------------------------------------------------------------------------- number-level checks


def check_robust_le_clean(clean_acc: float, robust: Mapping[str, float]) -> Flag:
    """Robust accuracy under any attack must not exceed clean accuracy."""
    above = {k: v for k, v in robust.items() if v > clean_acc + ACC_SLACK}
    detail = (f"clean {clean_acc:.4f} < " + ", ".join(f"{k} {v:.4f}" for k, v in above.items())
              if above else f"all {len(robust)} robust accuracies <= clean {clean_acc:.4f}")
    return Flag("robust_above_clean", not above, detail)


def check_monotone_in_eps(acc_by_eps: Mapping[float, float], tol: float = 0.01) -> Flag:
    """Accuracy must be non-increasing in eps (up to tol) against every smaller eps."""
    rises, lowest = [], (math.inf, None)
    for eps in sorted(acc_by_eps):
        acc = acc_by_eps[eps]
        if acc > lowest[0] + tol:
            rises.append(f"{acc:.4f} at eps {eps:g} > {lowest[0]:.4f} at eps {lowest[1]:g}")
        lowest = min(lowest, (acc, eps), key=lambda t: t[0])
    detail = "; ".join(rises) if rises else (
        "non-increasing over eps " + ", ".join(f"{e:g}" for e in sorted(acc_by_eps)))
    return Flag("not_monotone_in_eps", not rises, detail)


def check_large_eps(acc_at_large_eps: float, threshold: float = 0.05) -> Flag:
    """At a very large eps (0.5 L∞) an attack that works leaves ~0 accuracy."""
    ok = acc_at_large_eps <= threshold
    return Flag("robust_at_large_eps", ok,
                f"accuracy {acc_at_large_eps:.4f} at a very large eps (threshold {threshold:g})")


def check_more_iterations(acc_few: float, acc_many: float, tol: float = 0.01) -> Flag:
    """More steps/restarts must not raise robust accuracy (if they do, the attack is not converged
    or the loss surface is masked)."""
    ok = acc_many <= acc_few + tol
    return Flag("more_steps_raise_accuracy", ok,
                f"few steps {acc_few:.4f}, many steps {acc_many:.4f} (tol {tol:g})")


def check_square_vs_whitebox(aa_summary: Mapping[str, float], tol: float = 0.0) -> Flag:
    """Square (black-box, run on the points the white-box attacks left) must not lower accuracy
    further: if it does, gradients are masked. Mirrors pyautoattack checks.check_square_sr."""
    accs = {k: v for k, v in aa_summary.items() if k not in ("n", "robust")}
    if "square" not in accs or len(accs) <= 2:  # needs clean + a white-box attack + square
        return Flag("square_beats_whitebox", True, "square not run after a white-box attack")
    best_whitebox = min(v for k, v in accs.items() if k != "square")
    drop = best_whitebox - accs["square"]
    return Flag("square_beats_whitebox", not drop > tol + ACC_SLACK,
                f"square lowered robust accuracy by {max(drop, 0.0):.4f} "
                f"(from {best_whitebox:.4f}; tol {tol:g})")


# ---------------------------------------------------------------------------- model-level checks


def _input_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return input_grad(loss, x)


def check_zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         frac: float = 0.0) -> Flag:
    """Fraction of examples whose CE input gradient is exactly zero must not exceed frac."""
    device = model_device(model, x.device)
    grad = _input_grads(model, x.to(device), y.to(device))
    zero = (grad.flatten(1).abs().sum(1) == 0).float().mean().item()
    return Flag("zero_gradients", zero <= frac,
                f"{zero:.4f} of {len(x)} examples have an all-zero input gradient (max {frac:g})")


def check_softmax_output(model: nn.Module, x: torch.Tensor, alpha: float = 1e-5) -> Flag:
    """The attacked outputs must be logits, not a probability distribution."""
    with torch.no_grad():
        out = model(x.to(model_device(model, x.device)))
    probs = bool(out.max() < 1 + alpha and out.min() > -alpha
                 and ((out.sum(-1) - 1).abs() < alpha).all())
    return Flag("softmax_output", not probs,
                "outputs look like probabilities (in [0,1], rows sum to 1): attack the logits"
                if probs else f"outputs in [{out.min().item():.3g}, {out.max().item():.3g}]")


def check_deterministic(model: nn.Module, x: torch.Tensor, n: int = 3, tol: float = 1e-6) -> Flag:
    """n forward passes must agree (L2-normalised outputs within tol, same predictions)."""
    device = model_device(model, x.device)
    with torch.no_grad():
        outs = [model(x.to(device)) for _ in range(n)]
    unit = [o / (o.flatten(1).norm(dim=1, keepdim=True) + 1e-10) for o in outs]
    diff = max((u - unit[0]).abs().max().item() for u in unit)
    flips = sum((o.argmax(1) != outs[0].argmax(1)).sum().item() for o in outs)
    ok = diff <= tol and flips == 0
    return Flag("nondeterministic", ok,
                f"max normalised output difference {diff:.3g} over {n} passes "
                f"(tol {tol:g}), {flips} prediction changes")


# ------------------------------------------------------------------------------------ together


def _large_eps(norm: str, x: torch.Tensor) -> float:
    return LARGE_EPS.get(norm, 0.5 * math.sqrt(x[0].numel()))


def _probe_eps(eps: float, norm: str) -> List[float]:
    """eps/2, eps, 2*eps (L∞ capped at 1)."""
    cap = 1.0 if norm == "Linf" else math.inf
    return [eps / 2, eps, min(2 * eps, cap)]


def run_model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     norm: str = "Linf", seed: int = 0, pgd_steps: int = 10,
                     batch_size: int = 250) -> Tuple[List[Flag], Dict]:
    """Model-level checks plus PGD probes, in eval mode (restored afterwards).

    PGD-`pgd_steps` at eps/2, eps, 2*eps and a very large eps; PGD with 5x steps and
    MANY_RESTARTS restarts at eps. Returns (flags, measurements): measurements hold every accuracy
    the flags were computed from (keys: clean, pgd_by_eps {eps: acc}, large_eps, pgd_large_eps,
    pgd_steps, pgd_many_steps, pgd_many, ...), so they can be reported.
    """
    def pgd_acc(e, steps=pgd_steps, restarts=1):
        atk = PGD(model, eps=e, norm=norm, steps=steps, restarts=restarts, seed=seed)
        return robust_accuracy(model, atk, x, y, batch_size)

    with eval_mode(model):
        probe = x[:batch_size]
        flags = [check_zero_gradients(model, probe, y[:batch_size]),
                 check_softmax_output(model, probe), check_deterministic(model, probe)]
        clean = accuracy(model, x, y, batch_size)
        by_eps = {e: pgd_acc(e) for e in _probe_eps(eps, norm)}
        large = _large_eps(norm, x)
        acc_large = pgd_acc(large)
        acc_many = pgd_acc(eps, steps=5 * pgd_steps, restarts=MANY_RESTARTS)
    flags += [check_robust_le_clean(clean, {f"pgd@{e:g}": a for e, a in by_eps.items()}),
              check_monotone_in_eps({0.0: clean, **by_eps, large: acc_large}),
              check_large_eps(acc_large),
              check_more_iterations(by_eps[eps], acc_many)]
    measurements = {"n": len(x), "eps": eps, "norm": norm, "seed": seed, "clean": clean,
                    "pgd_by_eps": by_eps, "large_eps": large, "pgd_large_eps": acc_large,
                    "pgd_steps": pgd_steps, "pgd_many_steps": 5 * pgd_steps,
                    "pgd_many_restarts": MANY_RESTARTS, "pgd_many": acc_many}
    return flags, measurements


def check_before_autoattack(model: nn.Module, x: torch.Tensor) -> List[Flag]:
    """The checks that decide how AutoAttack runs: two forward passes on the same batch
    (`nondeterministic`: attack with the "rand" version) and the output range (`softmax_output`:
    attack the outputs and their logarithm). The global RNG is forked, so the evaluation after it
    draws the same random numbers as without it."""
    device = model_device(model, x.device)
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        flags = [check_deterministic(model, x, n=2), check_softmax_output(model, x)]
    for flag in flags:
        flag.detail = f"before AutoAttack: {flag.detail}"
    return flags
