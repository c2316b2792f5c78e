"""Adaptive evaluation of a purify → classify defense (docs/methods.md §1.7, docs/evaluation.md §3).

Three attacks on the first `n` evaluation images, each labelled with what it is:

1. **adaptive, unrolled** — the main `evaluate()` run: AutoAttack standard on the deployed decision
   function `PurifiedClassifier(purifier, g)`; gradients flow through the blur, the unrolled FISTA and
   the patch reassembly (the nearest-cluster choice is piecewise constant: zero gradient, as it truly
   is). `evaluate_purified` only labels it (`autoattack_mode`).
2. **adaptive, BPDA + EOT** — `BPDAPurified`: forward purify → classify, backward through the
   classifier only (straight-through: g(x + (purify(x) − x).detach()), so ∂/∂x is g's gradient at the
   purified image). Attacked with APGD-CE then APGD-T (pyautoattack, the standard version's settings:
   1 restart, 9 target classes), each on the points still robust. EOT: the APGD gradient is averaged
   over `eot_samples` calls (pyautoattack's `eot_iter`); the purifier is deterministic, so every call
   is the same and 1 sample is exact — more only repeats work. The option exists for random purifiers.
3. **non-adaptive** (grey-box, transfer) — APGD-CE + APGD-T examples crafted on the bare classifier g,
   then classified by purify → g. Only adversarial examples that fooled g are transferred; the others
   stay clean images (AutoAttack's orchestration). It is not a robustness claim, and is labelled so.

The SRD robust number is the minimum over the adaptive attacks (1 and 2). `adaptive_gap` is raised
when the non-adaptive accuracy exceeds it by more than `gap_tol` (our choice: 0.05): expected for
purification, and the flag records how much a non-adaptive evaluation would have overstated it.

Chunks of `chunk_size` examples run as Ray tasks (one CPU, or one GPU each when the cluster has
GPUs), chunk i seeded with `chunk_seed(seed, i)`, so the result does not depend on the task count.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..attacks.autoattack import (build_autoattack, cuda_devices, orchestrate, verify_examples, chunk_plan, chunk_seed,
                                  summarize_autoattack)
from ..attacks.pgd import eval_mode, frozen_params, model_device
from ..errors import ConfigError
from ..progress import AttackBar
from ..raypool import run_pool
from .resume import ChunkStore
from .sharded import restore_chunks

ADAPTIVE_MODE = "adaptive (end to end through the unrolled purifier)"
BPDA_MODE = "adaptive BPDA + EOT (identity backward through the purifier)"
NON_ADAPTIVE_MODE = "non-adaptive (attack on the bare classifier, transferred)"
APGD_ATTACKS = ("apgd-ce", "apgd-t")
AA_ADAPTIVE = f"AutoAttack standard, {ADAPTIVE_MODE}"
APGD_BPDA = f"APGD-CE + APGD-T, {BPDA_MODE}"
# What the summary columns adaptive_acc / nonadaptive_acc hold
ADAPTIVE_COLUMN = f"min over the adaptive attacks: [{AA_ADAPTIVE}], [{APGD_BPDA}]"
NONADAPTIVE_COLUMN = f"APGD-CE + APGD-T, {NON_ADAPTIVE_MODE}"
GAP_TOL = 0.05  # adaptive_gap: non-adaptive accuracy above the adaptive robust accuracy by more than this


class BPDAPurified(nn.Module):
    """classifier(purifier(x)) forward; identity backward through the purifier (BPDA, Athalye et al. 2018)."""

    def __init__(self, purifier: nn.Module, classifier: nn.Module):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = self.purifier(x)  # (N, C, H, W)
        return self.classifier(x + (x_hat - x).detach())  # value at x_hat, d/dx = classifier's at x_hat


def apgd_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
               attacks: Sequence[str] = APGD_ATTACKS, seed: int = 0, eot_samples: int = 1,
               device=None) -> Tuple[List[Optional[str]], torch.Tensor]:
    """(broken_by, x_adv) of one chunk under pyautoattack's APGD attacks, each on the points still robust.

    Settings are the standard version's (APGD-CE 1 restart, APGD-T 9 target classes or C−1 when fewer,
    100 iterations each); `eot_samples` sets both attacks' `eot_iter`. x_adv holds the adversarial
    example of every point an attack broke and the clean image elsewhere; each is re-checked (in the
    ball, in [0,1], misclassified by `model`). Eval mode, frozen parameters and the global RNG restored.
    """
    if eot_samples < 1:
        raise ConfigError(f"eot_samples={eot_samples} must be >= 1")
    device = torch.device(device) if device is not None else model_device(model, x.device)
    x, y = x.detach().to(device).float(), y.detach().to(device).long()
    if len(x) == 0:
        return [], x
    with eval_mode(model), frozen_params(model), torch.no_grad(), \
            torch.random.fork_rng(devices=cuda_devices(device)):
        aa = build_autoattack(model, eps, norm, "custom", list(attacks), device, seed)
        num_classes = model(x[:1]).shape[1]
        aa.apgd.n_restarts = 1
        aa.apgd_targeted.n_restarts = 1
        aa.apgd_targeted.n_target_classes = min(9, num_classes - 1)
        aa.apgd.eot_iter = aa.apgd_targeted.eot_iter = int(eot_samples)
        broken_by, x_adv = orchestrate(aa, x, y, seed)
        verify_examples(model, x, x_adv, y, broken_by, eps, norm)
    return broken_by, x_adv


def _bpda_task(purified: nn.Module, x, y, kwargs, threads):
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bpda = BPDAPurified(purified.purifier, purified.classifier).to(device).eval()
    broken_by, _ = apgd_chunk(bpda, x, y, device=device, **kwargs)
    return broken_by


def _transfer_task(purified: nn.Module, x, y, kwargs, threads):
    """Attack the bare classifier; return (broken_by on g, per-example correct after purify → g)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    purified = purified.to(device).eval()
    broken_by, x_adv = apgd_chunk(purified.classifier, x, y, device=device, **kwargs)
    with torch.no_grad():
        correct = (purified(x_adv).argmax(1) == y.to(device)).tolist()
    return broken_by, correct


def _run_chunks(task, purified: nn.Module, x, y, *, seed: int, chunk_size: int, num_shards: int,
                kwargs: Dict[str, Any], bar: Optional[AttackBar] = None,
                broken_of: Callable[[Any], List[Optional[str]]] = lambda r: r, store=None) -> List[Any]:
    """`task` over fixed chunks as Ray tasks (at most `num_shards` at a time); results in chunk order.
    `bar` gets each chunk's `broken_of(result)` as it returns. `store` (a ChunkStore): chunks saved by an
    interrupted run are read back, the others saved as they return."""
    plan = chunk_plan(len(x), chunk_size)
    results: Dict[int, Any] = {}

    def saved(i, result):
        results[i] = result
        if bar is not None:
            bar.chunk(broken_of(result))

    queue = restore_chunks(plan, store, saved)
    if not queue:
        return [results[i] for i in range(len(plan))]
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    resources, threads = ({"num_gpus": 1}, None) if gpus else ({"num_cpus": 1}, 1)
    remote = ray.remote(max_retries=2, **resources)(task)
    model_ref = ray.put(purified.cpu())
    width = max(1, min(num_shards, gpus or num_shards))

    def submit(_slot, item):
        i, (s, e) = item
        return remote.remote(model_ref, x[s:e].cpu(), y[s:e].cpu(), {**kwargs, "seed": chunk_seed(seed, i)}, threads)

    def returned(item, value) -> None:
        i = item[0]
        results[i] = value
        if store is not None:
            store.save(i, *plan[i], value)
        if bar is not None:
            bar.chunk(broken_of(value))

    run_pool(range(width), queue, submit=submit, on_result=returned)  # at most `width` tasks at a time
    return [results[i] for i in range(len(plan))]


def bpda_accuracy(purified: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
                  seed: int = 0, eot_samples: int = 1, chunk_size: int = 100, num_shards: int = 2,
                  attacks: Sequence[str] = APGD_ATTACKS, progress: Optional[bool] = None,
                  label: str = "srd", resume_dir=None, resume_identity: str = "") -> Dict[str, Any]:
    """BPDA + EOT APGD attack on `purified` (a PurifiedClassifier); per-attack robust accuracy. `progress`
    (None: `progress_enabled()`) draws a bar over the images with the robust points left per attack.
    `resume_dir`: finished chunks are saved there and read back by a rerun (see `evaluation.resume`)."""
    t0 = time.perf_counter()
    kw = {"eps": eps, "norm": norm, "attacks": list(attacks), "eot_samples": eot_samples}
    store = ChunkStore.maybe_open(resume_dir, "bpda", purified, x, y, {**kw, "seed": seed, "chunk_size": chunk_size,
                                                        "identity": resume_identity})
    with AttackBar(len(x), list(attacks), f"  [{label}] BPDA + EOT", enabled=progress) as bar:
        parts = _run_chunks(_bpda_task, purified, x, y, seed=seed, chunk_size=chunk_size, num_shards=num_shards,
                            kwargs=kw, bar=bar, store=store)
    broken = [b for part in parts for b in part]
    summary = summarize_autoattack(broken, list(attacks))
    return {"mode": BPDA_MODE, "attack": " + ".join(a.upper() for a in attacks) + " (pyautoattack) on "
            "classifier(x + (purify(x) - x).detach())", "robust_acc": summary["robust"], "per_attack": summary,
            "eot_samples": eot_samples, "eot_note": "the purifier is deterministic: 1 sample is exact",
            "n": len(x), "seed": seed, "chunk_size": chunk_size, "seconds": time.perf_counter() - t0,
            **({"chunks": store.counts(len(parts))} if store is not None else {})}


def transfer_accuracy(purified: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
                      seed: int = 0, chunk_size: int = 100, num_shards: int = 2,
                      attacks: Sequence[str] = APGD_ATTACKS, progress: Optional[bool] = None,
                      label: str = "srd", resume_dir=None, resume_identity: str = "") -> Dict[str, Any]:
    """Non-adaptive: APGD examples crafted on the bare classifier, classified by purify → classify. `progress`
    and `resume_dir` as in `bpda_accuracy` (the bar counts the bare classifier's robust points)."""
    t0 = time.perf_counter()
    kw = {"eps": eps, "norm": norm, "attacks": list(attacks)}
    store = ChunkStore.maybe_open(resume_dir, "transfer", purified, x, y, {**kw, "seed": seed, "chunk_size": chunk_size,
                                                            "identity": resume_identity})
    with AttackBar(len(x), list(attacks), f"  [{label}] non-adaptive (bare classifier)", enabled=progress) as bar:
        parts = _run_chunks(_transfer_task, purified, x, y, seed=seed, chunk_size=chunk_size,
                            num_shards=num_shards, kwargs=kw, bar=bar, broken_of=lambda r: r[0], store=store)
    broken = [b for part in parts for b in part[0]]
    correct = [c for part in parts for c in part[1]]
    bare = summarize_autoattack(broken, list(attacks))
    return {"mode": NON_ADAPTIVE_MODE, "attack": " + ".join(a.upper() for a in attacks) + " (pyautoattack) "
            "on the bare classifier, adversarial examples then purified and classified",
            "robust_acc": sum(correct) / max(1, len(correct)), "bare_classifier": bare,
            "n": len(x), "seed": seed, "chunk_size": chunk_size, "seconds": time.perf_counter() - t0,
            **({"chunks": store.counts(len(parts))} if store is not None else {})}


def adaptive_gap_check(adaptive: float, non_adaptive: float, tol: float = GAP_TOL) -> Dict[str, Any]:
    gap = non_adaptive - adaptive
    return {"name": "adaptive_gap", "passed": not gap > tol,
            "detail": f"non-adaptive {non_adaptive:.4f} vs adaptive {adaptive:.4f}: gap {gap:+.4f} (tol {tol:g}); "
                      "a gap means attacks on the bare classifier overstate the defense"}


def evaluate_purified(purified: nn.Module, x: torch.Tensor, y: torch.Tensor, result: Dict[str, Any], *,
                      eps: float, norm: str = "Linf", seed: int = 0, eot_samples: int = 1, chunk_size: int = 100,
                      num_shards: int = 2, verbose: bool = True, label: str = "srd", resume_dir=None,
                      resume_identity: str = "") -> Dict[str, Any]:
    """Add the BPDA and non-adaptive attacks to `result` (the main `evaluate()` of `purified`, which is
    the adaptive unrolled AutoAttack) on its first `result["n_autoattack"]` images, in place.

    Adds: autoattack_mode; bpda and non_adaptive (details, per-attack numbers); adaptive_acc (the
    minimum over the adaptive attacks: the defense's robust accuracy) and adaptive_attack (the attack
    that gave it); nonadaptive_acc (the transferred number); the adaptive_gap check and flag.
    """
    n = int(result.get("n_autoattack") or 0)
    result["autoattack_mode"] = ADAPTIVE_MODE
    if n == 0:
        result.update(bpda=None, non_adaptive=None, adaptive_acc=None, adaptive_attack=None, nonadaptive_acc=None)
        return result
    xa, ya = x[:n].cpu(), y[:n].cpu()
    kw = dict(eps=eps, norm=norm, seed=seed, chunk_size=chunk_size, num_shards=num_shards, resume_dir=resume_dir,
              resume_identity=resume_identity)
    shown = None if verbose else False  # bars when interactive (progress_enabled())
    bpda = bpda_accuracy(purified, xa, ya, eot_samples=eot_samples, progress=shown, label=label, **kw)
    transfer = transfer_accuracy(purified, xa, ya, progress=shown, label=label, **kw)
    adaptive = {AA_ADAPTIVE: result["autoattack_acc"], APGD_BPDA: bpda["robust_acc"]}
    worst = min(adaptive, key=adaptive.get)
    check = adaptive_gap_check(adaptive[worst], transfer["robust_acc"])
    result.update(bpda=bpda, non_adaptive=transfer, adaptive_acc=adaptive[worst], adaptive_attack=worst,
                  nonadaptive_acc=transfer["robust_acc"])
    result["checks"] = list(result.get("checks", [])) + [check]
    result["flags"] = list(result.get("flags", [])) + ([] if check["passed"] else ["adaptive_gap"])
    if verbose:
        print(f"  [{label}] BPDA {bpda['robust_acc']:.4f} ({bpda['seconds']:.1f}s), non-adaptive "
              f"{transfer['robust_acc']:.4f} ({transfer['seconds']:.1f}s), adaptive min {adaptive[worst]:.4f} "
              f"on n={n}", file=sys.stderr, flush=True)
    return result
