"""A RobustBench-style entry point: `benchmark(model, n_examples=..., dataset=..., threat_model=..., eps=...)`.

Code written against RobustBench's `robustbench.eval.benchmark` runs here with the same call and gets
(clean accuracy, AutoAttack robust accuracy) back, as fractions, measured by `rayrobust.evaluate` on the
first `n_examples` test images (AutoAttack on all of them, as RobustBench does):

    >>> from rayrobust import benchmark
    >>> clean_acc, robust_acc = benchmark(model, n_examples=10000, dataset="cifar10", threat_model="Linf",
    ...                                   eps=8 / 255, device=torch.device("cuda:0"), batch_size=500)
    >>> result = benchmark(model, dataset="cifar10", threat_model="L2", eps=0.5, return_result=True)

What differs from RobustBench, on purpose:
- `eps` may be left out for the leaderboards' own budgets (CIFAR-10/100 L-inf 8/255, CIFAR-10 L2 0.5,
  ImageNet L-inf 4/255 and L2 3.0, all in [0,1] pixel units); RobustBench requires it.
- `dataset` may also be any rayrobust dataset name, an (x, y) pair of tensors or a rayrobust dataset.
- the result carries rayrobust's sanity checks and flags (`checks=False` leaves them out), the PGD number
  (labelled weaker) and the AutoAttack breakdown; `return_result=True` returns all of it.
- `preprocessing` must be None: normalise inside the model (rayrobust attacks [0,1] images).
- the corruptions threat model is not offered.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError

THREAT_MODELS = ("Linf", "L2")
# The RobustBench leaderboards' budgets, in [0,1] pixel units: the default `eps` of a (dataset, threat model)
LEADERBOARD_EPS = {("cifar10", "Linf"): 8 / 255, ("cifar100", "Linf"): 8 / 255, ("cifar10", "L2"): 0.5,
                   ("imagenet", "Linf"): 4 / 255, ("imagenet", "L2"): 3.0}


def _name(value: Any) -> str:
    """A string, or an enum's value (RobustBench passes BenchmarkDataset / ThreatModel enums)."""
    return str(getattr(value, "value", value))


def _checked_call(dataset: Any, threat_model: Any, preprocessing: Any, n_examples: Any, batch_size: Any,
                  eps: Optional[float]) -> Tuple[str, Optional[str], float]:
    """(threat model, dataset name or None for tensors, eps) of a benchmark call; a ConfigError naming the fix
    for an argument RobustBench's call accepts and rayrobust does not."""
    threat = _name(threat_model)
    if threat not in THREAT_MODELS:
        raise ConfigError(f"threat_model={threat!r} is not offered; use 'Linf' or 'L2' "
                          "(the corruptions benchmark is RobustBench's own)")
    if preprocessing is not None:
        raise ConfigError("preprocessing must be None: rayrobust attacks [0,1] images, so put the normalisation "
                          "inside the model (e.g. nn.Sequential(Normalize(mean, std), model))")
    if not (isinstance(n_examples, int) and n_examples >= 1):
        raise ConfigError(f"n_examples={n_examples!r} must be an integer >= 1 (RobustBench's leaderboards use 10000)")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
    name = _name(dataset) if isinstance(dataset, str) or hasattr(dataset, "value") else None
    if eps is None:
        if (name, threat) not in LEADERBOARD_EPS:
            raise ConfigError(f"eps is needed for dataset={name or 'tensors'!r} and threat_model={threat!r}; pass "
                              f"eps=... in [0,1] pixel units (leaderboard budgets: "
                              + ", ".join(f"{d} {t} {e:.4g}" for (d, t), e in LEADERBOARD_EPS.items()) + ")")
        eps = LEADERBOARD_EPS[(name, threat)]
    return threat, name, eps


def benchmark(
    model: nn.Module,
    n_examples: int = 10000,
    dataset: Any = "cifar10",
    threat_model: Any = "Linf",
    to_disk: bool = False,
    model_name: Optional[str] = None,
    data_dir: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    batch_size: int = 32,
    eps: Optional[float] = None,
    log_path: Optional[str] = None,
    preprocessing: Any = None,
    aa_state_path: Optional[Union[str, Path]] = None,
    *,
    version: str = "standard",
    seed: int = 0,
    checks: bool = True,
    backend: str = "local",
    num_shards: int = 2,
    return_result: bool = False,
    verbose: bool = True,
) -> Union[Tuple[float, float], Dict[str, Any]]:
    """Clean and AutoAttack accuracy of `model` (logits from [0,1] images) on the first `n_examples` test
    images of `dataset` under `threat_model` ("Linf" or "L2") at `eps`: RobustBench's `benchmark` call.

    Returns (clean_acc, robust_acc) as fractions, like RobustBench; with `return_result=True` the full
    `rayrobust.evaluate` result dict (flags, per-attack breakdown, provenance of the attack).
    `batch_size` is the batch of clean accuracy and the chunk AutoAttack attacks at once (RobustBench's
    `bs`); `device` (None: the GPU when there is one) is where the model runs; `data_dir` is where the
    dataset's files are; `aa_state_path` a directory where finished AutoAttack chunks are saved so an
    interrupted run resumes; `to_disk=True` writes the result to `log_path` or, as RobustBench does,
    `model_info/<dataset>/<threat_model>/<model_name>.json`. `version` is AutoAttack's "standard", "plus"
    or "rand"; `backend="ray"` shards AutoAttack over `num_shards` Ray actors (the same result).
    """
    from .core import evaluate

    if isinstance(model, (list, tuple)):
        raise ConfigError("benchmark takes one model; evaluate an ensemble by wrapping it in one nn.Module")
    threat, name, eps = _checked_call(dataset, threat_model, preprocessing, n_examples, batch_size, eps)
    if name is not None:
        from ..data import load_dataset

        dataset = load_dataset(name, "test", root=data_dir, limit=n_examples)
    available = len(dataset[0]) if isinstance(dataset, (tuple, list)) else len(getattr(dataset, "x", ()))
    if available < n_examples:
        raise ConfigError(f"n_examples={n_examples} but the test set has {available} images; "
                          f"use n_examples <= {available}")
    if model.training and verbose:
        print("note: the model was in training mode; it is evaluated in eval mode", flush=True)
    result = evaluate(model, dataset, eps=eps, norm=threat, n=n_examples, n_autoattack=n_examples,
                      seed=seed, batch_size=batch_size, chunk_size=batch_size, checks=checks, version=version,
                      label=model_name or "model", verbose=verbose, backend=backend, num_shards=num_shards,
                      resume_dir=str(aa_state_path) if aa_state_path is not None else None, device=device)
    result["benchmark"] = {"dataset": name or result["dataset"], "threat_model": threat, "eps": eps,
                           "n_examples": n_examples, "model_name": model_name, "version": version}
    if to_disk:
        out = Path(log_path) if log_path else \
            Path("model_info") / (name or "tensors") / threat / f"{model_name or 'model'}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if return_result:
        return result
    return result["clean_acc"], result["autoattack_acc"]
