"""AutoAttack (pyautoattack, the reference implementation) run chunk by chunk so that sharding over
examples is exactly reproducible.

The orchestration mirrors `AutoAttack.run_standard_evaluation`: clean accuracy first, then each
attack in order, each only on the points still robust. What makes it shardable: examples are cut
into fixed chunks by *global index* (`chunk_plan`) and every chunk is attacked as one batch with its
own seed (`chunk_seed`). A chunk's result depends only on (model, chunk data, eps, norm, version,
seed), so running the chunks in any order, on any number of workers, gives the same per-example
outcome as `run_autoattack` running them one after another.

    >>> broken_by = run_autoattack(model, x, y, eps=0.1, seed=0, chunk_size=100)
    >>> summarize_autoattack(broken_by, AA_STANDARD)
    {'n': 1000, 'clean': 0.91, 'apgd-ce': 0.62, 'apgd-t': 0.60, 'fab-t': 0.60, 'square': 0.60,
     'robust': 0.60}
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .pgd import eval_mode, frozen_params, model_device, perturbation_norm

AA_STANDARD = ["apgd-ce", "apgd-t", "fab-t", "square"]
AA_VERSIONS = ("standard", "plus", "rand", "custom")
BALL_TOL = 1e-5  # slack on the eps-ball check of returned adversarial examples


# How the reference orchestrator sets up each attack before calling it (autoattack.py).
def _apgd_ce(aa):
    aa.apgd.loss = "ce"
    return aa.apgd


def _apgd_dlr(aa):
    aa.apgd.loss = "dlr"
    return aa.apgd


def _fab(aa):
    aa.fab.targeted = False
    return aa.fab


def _fab_t(aa):
    aa.fab.targeted = True
    aa.fab.n_restarts = 1
    return aa.fab


_PREPARE: Dict[str, Callable] = {
    "apgd-ce": _apgd_ce,
    "apgd-dlr": _apgd_dlr,
    "apgd-t": lambda aa: aa.apgd_targeted,
    "fab": _fab,
    "fab-t": _fab_t,
    "square": lambda aa: aa.square,
}
AA_ATTACKS = sorted(_PREPARE)


def chunk_plan(n: int, chunk_size: int) -> List[Tuple[int, int]]:
    """[(start, stop), ...] covering range(n) in order; the last chunk may be shorter."""
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ConfigError(f"chunk_size={chunk_size!r} is invalid; use an integer >= 1")
    if n < 0:
        raise ConfigError(f"n={n!r} examples is invalid; use n >= 0")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def chunk_seed(seed: int, chunk_index: int) -> int:
    """The seed of chunk `chunk_index` of a run seeded with `seed` (distinct per chunk)."""
    return seed * 1_000_003 + chunk_index


def _resolve_attacks(version: str, attacks: Optional[Sequence[str]]) -> Optional[List[str]]:
    if version not in AA_VERSIONS:
        raise ConfigError(f"autoattack version={version!r} is unknown; use one of {AA_VERSIONS}")
    if version != "custom":
        if attacks is not None:
            raise ConfigError(f"attacks={list(attacks)} is only used with version='custom' "
                              f"(version={version!r} fixes its own attacks)")
        return None
    if not attacks:
        raise ConfigError(f"version='custom' needs a list of attacks from {AA_ATTACKS}")
    unknown = [a for a in attacks if a not in _PREPARE]
    if unknown:
        raise ConfigError(f"unknown autoattack attack(s) {unknown}; valid: {AA_ATTACKS}")
    return list(attacks)


def _build(model, eps, norm, version, attacks, device, seed):
    """A configured pyautoattack.AutoAttack (we use its attack objects, not its orchestrator)."""
    from pyautoattack import AutoAttack

    if norm not in ("Linf", "L2", "L1"):
        raise ConfigError(f"autoattack norm={norm!r} is unknown; use 'Linf', 'L2' or 'L1'")
    if not eps > 0:
        raise ConfigError(f"autoattack eps={eps!r} must be > 0 ([0,1] pixel units, e.g. 8/255)")
    aa = AutoAttack(model, attacks=_resolve_attacks(version, attacks), device=device, eps=eps,
                    norm=norm, seed=seed, version=version)
    aa.verbose = False
    return aa


def _orchestrate(aa, x, y, seed) -> Tuple[List[Optional[str]], torch.Tensor]:
    """Clean pass, then each attack on the still-robust points (one batch), in order."""
    robust = aa.model(x).argmax(1) == y  # (N,) bool
    broken_by: List[Optional[str]] = [None if r else "clean" for r in robust.tolist()]
    x_adv = x.clone()
    for name in aa.attacks_to_run:
        idx = robust.nonzero().squeeze(1)  # (M,) still robust
        if idx.numel() == 0:
            break
        attack = _PREPARE[name](aa)
        attack.seed = seed
        adv = attack.perturb(x[idx].clone(), y[idx].clone())
        fooled = aa.model(adv).argmax(1) != y[idx]
        robust[idx[fooled]] = False
        x_adv[idx[fooled]] = adv[fooled]
        for i in idx[fooled].tolist():
            broken_by[i] = name
    return broken_by, x_adv


def _verify(model, x, x_adv, y, broken_by, eps, norm) -> None:
    """Every claimed adversarial example must be in the ball, in [0,1] and misclassified."""
    size = perturbation_norm(x_adv - x, norm)
    bad_ball = (size > eps + BALL_TOL).nonzero().squeeze(1).tolist()
    bad_box = ((x_adv < 0) | (x_adv > 1)).flatten(1).any(1).nonzero().squeeze(1).tolist()
    claimed = torch.tensor([b is not None for b in broken_by], device=y.device)
    still_right = claimed & (model(x_adv).argmax(1) == y)
    bad_label = still_right.nonzero().squeeze(1).tolist()
    problems = {"outside the eps ball": bad_ball, "outside [0,1]": bad_box,
                "claimed adversarial but correctly classified": bad_label}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise RuntimeError(f"autoattack returned invalid adversarial examples (chunk-local "
                           f"indices): {problems}; max {norm} perturbation {size.max().item():.6g} "
                           f"vs eps {eps}")


def _cuda_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def autoattack_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     norm: str = "Linf", version: str = "standard",
                     attacks: Optional[Sequence[str]] = None, seed: int = 0,
                     device=None) -> List[Optional[str]]:
    """Attack one chunk as one batch. Per example: "clean" (misclassified without attack), the name
    of the first attack that fooled it, or None (robust). eps in [0,1] pixel units; `seed` is set
    on every attack object before it runs (pass `chunk_seed(run_seed, chunk_index)`).

    Runs in eval mode with parameters frozen (FAB calls .backward()), restoring both afterwards;
    the global torch RNG (which the reference attacks reseed) is restored too.
    """
    device = torch.device(device) if device is not None else model_device(model, x.device)
    if len(x) == 0:
        return []
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"autoattack inputs must be in [0,1] (got [{x.min().item():.3g}, "
                        f"{x.max().item():.3g}]); normalise inside the model, not the data")
    x, y = x.detach().to(device).float(), y.detach().to(device).long()
    aa = _build(model, eps, norm, version, attacks, device, seed)
    with eval_mode(model), frozen_params(model), torch.no_grad(), \
            torch.random.fork_rng(devices=_cuda_devices(device)):
        broken_by, x_adv = _orchestrate(aa, x, y, seed)
        _verify(model, x, x_adv, y, broken_by, eps, norm)
    return broken_by


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                   norm: str = "Linf", version: str = "standard",
                   attacks: Optional[Sequence[str]] = None, seed: int = 0, chunk_size: int = 100,
                   device=None, progress: Optional[Callable[[int, int], None]] = None
                   ) -> List[Optional[str]]:
    """AutoAttack over all of x, chunk by chunk (chunk i seeded with chunk_seed(seed, i)).
    progress(done_examples, total_examples) is called after each chunk."""
    _resolve_attacks(version, attacks)  # fail fast, before the first chunk
    broken_by: List[Optional[str]] = []
    for i, (start, stop) in enumerate(chunk_plan(len(x), chunk_size)):
        broken_by += autoattack_chunk(model, x[start:stop], y[start:stop], eps=eps, norm=norm,
                                      version=version, attacks=attacks,
                                      seed=chunk_seed(seed, i), device=device)
        if progress is not None:
            progress(stop, len(x))
    return broken_by


def attacks_for(version: str = "standard", attacks: Optional[Sequence[str]] = None) -> List[str]:
    """The attacks a (version, attacks) pair runs, in order."""
    resolved = _resolve_attacks(version, attacks)
    if resolved is not None:
        return resolved
    return {"standard": AA_STANDARD, "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t",
                                              "fab-t"], "rand": ["apgd-ce", "apgd-dlr"]}[version]


def summarize_autoattack(broken_by: Sequence[Optional[str]],
                         attacks: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """{"n", "clean", "<attack>" (robust accuracy after it, cumulative), ..., "robust"}
    as fractions of n (n itself is a count)."""
    attacks = list(attacks) if attacks is not None else AA_STANDARD
    unknown = {b for b in broken_by if b is not None and b != "clean" and b not in attacks}
    if unknown:
        raise ValueError(f"broken_by names attacks {sorted(unknown)} not in {attacks}")
    n = len(broken_by)
    frac = (lambda k: k / n) if n else (lambda k: float("nan"))
    remaining = sum(b != "clean" for b in broken_by)
    summary: Dict[str, float] = {"n": n, "clean": frac(remaining)}
    for name in attacks:
        remaining -= sum(b == name for b in broken_by)
        summary[name] = frac(remaining)
    summary["robust"] = frac(sum(b is None for b in broken_by))
    return summary
