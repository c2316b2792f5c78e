"""Batched sparse coding (FISTA) and dictionary learning (alternating FISTA + MOD), torch, CPU or GPU.

Model: patches X (n, m) ~ A D with a dictionary D (k, m) of unit-norm atoms (rows) and sparse
codes A (n, k), minimising   0.5 * ||X - A D||_F^2 + lam * ||A||_1   (per patch: the lasso).

- `fista(X, D, lam, iters)`: a fixed number of FISTA iterations from A = 0 (Beck & Teboulle 2009),
  step 1/L with L = ||D D^T||_2. Deterministic and differentiable in X (the purifier unrolls it);
  batched over leading dims: X (..., n, m), D (..., k, m) -> A (..., n, k).
- `learn_dictionary(X, k, ...)`: `rounds` of (FISTA codes, warm-started; MOD update
  D = (A^T A + eps I)^-1 A^T X; atoms renormalised; unused atoms re-seeded with the worst-fit
  patches). bench/dictionaries.py compares it with scikit-learn's MiniBatchDictionaryLearning.

Example:
    >>> D, info = learn_dictionary(torch.randn(5000, 16), n_atoms=32, lam=0.05, seed=0)
    >>> A = fista(torch.randn(10, 16), D, lam=0.05, iters=30)       # (10, 32)
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

import torch


def lipschitz(D: torch.Tensor) -> torch.Tensor:
    """||D D^T||_2 = largest eigenvalue of D^T D: the gradient's Lipschitz constant. D (..., k, m) -> (...,)."""
    gram = D.transpose(-1, -2) @ D  # (..., m, m): smaller than D D^T when overcomplete
    return torch.linalg.eigvalsh(gram.double())[..., -1].to(D.dtype).clamp_min(1e-12)


def soft_threshold(v: torch.Tensor, thr: torch.Tensor | float) -> torch.Tensor:
    return torch.sign(v) * torch.relu(v.abs() - thr)


def fista(X: torch.Tensor, D: torch.Tensor, lam: float, iters: int, *, L: Optional[torch.Tensor] = None,
          A0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Lasso codes A (..., n, k) of X (..., n, m) on D (..., k, m) after `iters` FISTA steps."""
    G = D @ D.transpose(-1, -2)  # (..., k, k)
    B = X @ D.transpose(-1, -2)  # (..., n, k): the data enters only here, so d A / d X flows through B
    L = lipschitz(D) if L is None else L
    step = (1.0 / L)[..., None, None]  # (..., 1, 1)
    A = torch.zeros_like(B) if A0 is None else A0
    Y, t = A, 1.0
    for _ in range(iters):
        A_next = soft_threshold(Y - step * (Y @ G - B), lam * step)  # proximal gradient step
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        Y = A_next + ((t - 1.0) / t_next) * (A_next - A)  # Nesterov momentum
        A, t = A_next, t_next
    return A


def objective(X: torch.Tensor, A: torch.Tensor, D: torch.Tensor, lam: float) -> float:
    """0.5 ||X - A D||^2 + lam |A|_1, per patch."""
    return float((0.5 * (X - A @ D).pow(2).sum() + lam * A.abs().sum()) / len(X))


def relative_error(X: torch.Tensor, X_hat: torch.Tensor) -> float:
    """||X - X_hat||^2 / ||X||^2 (0 = perfect, 1 = nothing reconstructed)."""
    return float((X - X_hat).pow(2).sum() / X.pow(2).sum().clamp_min(1e-12))


def _init_atoms(X: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct random non-flat patches, unit norm (Gaussian atoms fill in when there are too few)."""
    norms = X.norm(dim=1)
    live = torch.nonzero(norms > 1e-6 * norms.max().clamp_min(1e-12)).flatten()
    pick = live[torch.randperm(len(live), generator=gen)[:k].to(live.device)]
    D = X[pick]
    if len(D) < k:
        extra = torch.randn(k - len(D), X.shape[1], generator=gen).to(X)
        D = torch.cat([D, extra])
    return D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)


def learn_dictionary(X: torch.Tensor, n_atoms: int, *, lam: float, fista_iters: int = 30, rounds: int = 20,
                     seed: int = 0, ridge: float = 1e-6) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Dictionary D (n_atoms, m) for patches X (n, m) on X's device; info: time, per-round objective."""
    if X.ndim != 2 or len(X) < n_atoms:
        raise ValueError(f"need patches (n, m) with n >= n_atoms={n_atoms}, got {tuple(X.shape)}")
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    D = _init_atoms(X, n_atoms, gen)  # (k, m)
    A = None
    history, reseeded = [], 0
    eye = torch.eye(n_atoms, device=X.device, dtype=X.dtype)
    for _ in range(rounds):
        A = fista(X, D, lam, fista_iters, A0=A)  # (n, k), warm start
        history.append(objective(X, A, D, lam))
        AtA = A.T @ A  # (k, k)
        D_new = torch.linalg.solve(AtA + ridge * AtA.diagonal().mean().clamp_min(1e-12) * eye, A.T @ X)  # MOD
        norms = D_new.norm(dim=1)  # (k,)
        dead = (A.abs().sum(0) == 0) | (norms < 1e-8)
        if dead.any():  # re-seed unused atoms with the patches the dictionary fits worst
            resid = (X - A @ D).pow(2).sum(1)
            worst = torch.topk(resid, int(dead.sum())).indices
            D_new[dead] = X[worst]
            norms = D_new.norm(dim=1)
            A[:, dead] = 0.0
            reseeded += int(dead.sum())
        D = D_new / norms.clamp_min(1e-12)[:, None]
        A = A * norms[None]  # same product A D after renormalising the atoms
    A = fista(X, D, lam, fista_iters)
    info = {"seconds": time.perf_counter() - t0, "objective": history + [objective(X, A, D, lam)],
            "relative_error": relative_error(X, A @ D), "nonzeros_per_patch": float((A != 0).sum(1).float().mean()),
            "reseeded_atoms": reseeded, "patches": len(X), "device": str(X.device)}
    return D, info
