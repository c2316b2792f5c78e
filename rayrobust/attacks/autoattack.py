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
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError, DataError
from .pgd import eval_mode, frozen_params, model_device, perturbation_norm

AA_STANDARD = ["apgd-ce", "apgd-t", "fab-t", "square"]
AA_VERSIONS = ("standard", "plus", "rand", "custom")
BALL_TOL = 1e-5  # slack on the eps-ball check of returned adversarial examples
RAND_EOT = 20  # gradient samples per APGD step in version="rand" (pyautoattack's setting)
RAND_VOTES = 9  # forward passes of a majority vote on a randomized model (version="rand")


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
StageCallback = Callable[[str, int, int], None]  # (stage: "clean" or an attack, robust points left, chunk size)


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


def build_autoattack(model, eps, norm, version, attacks, device, seed):
    """A configured pyautoattack.AutoAttack (we use its attack objects, not its orchestrator)."""
    from pyautoattack import AutoAttack

    if norm not in ("Linf", "L2", "L1"):
        raise ConfigError(f"autoattack norm={norm!r} is unknown; use 'Linf', 'L2' or 'L1'")
    if not eps > 0:
        raise ConfigError(f"autoattack eps={eps!r} must be > 0 ([0,1] pixel units, e.g. 8/255)")
    aa = AutoAttack(model, attacks=_resolve_attacks(version, attacks), device=device, eps=eps,
                    norm=norm, seed=seed, version=version)
    aa.verbose = False
    if version == "rand":
        aa.apgd.eot_iter = RAND_EOT
    return aa


def votes_for(version: str) -> int:
    """Forward passes per decision (clean, fooled, verified): a majority of RAND_VOTES for "rand"."""
    return RAND_VOTES if version == "rand" else 1


def misclassified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, votes: int = 1) -> torch.Tensor:
    """(N,) bool: argmax != y; with votes > 1, misclassified in more than half of `votes` passes
    (the majority vote that decides for a randomized model)."""
    if votes == 1:
        return model(x).argmax(1) != y
    wrong = torch.zeros(len(y), dtype=torch.long, device=y.device)
    for _ in range(votes):
        wrong += (model(x).argmax(1) != y).long()
    return 2 * wrong > votes


def attack_label(version: str = "standard", attacks: Optional[Sequence[str]] = None) -> str:
    """What a (version, attacks) run is called in results, e.g. "AutoAttack (rand, EOT=20)"."""
    if version == "rand":
        return f"AutoAttack (rand, EOT={RAND_EOT})"
    if version == "custom":
        return f"AutoAttack (custom: {', '.join(attacks_for(version, attacks))})"
    return f"AutoAttack ({version})"


def orchestrate(aa, x, y, seed, votes: int = 1, on_stage: Optional[StageCallback] = None
                 ) -> Tuple[List[Optional[str]], torch.Tensor]:
    """Clean pass, then each attack on the still-robust points (one batch), in order. With votes > 1
    every decision (clean, fooled) is a majority over `votes` forward passes. on_stage(stage, robust left,
    n) is called after the clean pass and after each attack."""
    robust = ~misclassified(aa.model, x, y, votes)  # (N,) bool
    broken_by: List[Optional[str]] = [None if r else "clean" for r in robust.tolist()]
    if on_stage is not None:
        on_stage("clean", len(x) - broken_by.count("clean"), len(x))
    x_adv = x.clone()
    for name in aa.attacks_to_run:
        idx = robust.nonzero().squeeze(1)  # (M,) still robust
        if idx.numel() == 0:
            break
        attack = _PREPARE[name](aa)
        attack.seed = seed
        adv = attack.perturb(x[idx].clone(), y[idx].clone())
        fooled = misclassified(aa.model, adv, y[idx], votes)
        robust[idx[fooled]] = False
        x_adv[idx[fooled]] = adv[fooled]
        for i in idx[fooled].tolist():
            broken_by[i] = name
        if on_stage is not None:
            on_stage(name, broken_by.count(None), len(x))
    return broken_by, x_adv


# Each softmax torch can compute, and the log-softmax with the same arguments.
_LOG_OF_SOFTMAX = {F.softmax: F.log_softmax, torch.softmax: torch.log_softmax,
                   torch.Tensor.softmax: torch.Tensor.log_softmax,
                   torch.special.softmax: torch.special.log_softmax}


class _SoftmaxCalls(TorchFunctionMode):
    """Records every softmax computed inside it: (output, the log-softmax of the same input)."""

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[torch.Tensor, Callable, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _LOG_OF_SOFTMAX:
            self.calls.append((out, _LOG_OF_SOFTMAX[func], args, kwargs))
        return out


class LogOutputs(nn.Module):
    """log(model(x)), for a model whose outputs are probabilities: the attacks then see log-probabilities,
    which are logits up to a per-example constant, instead of saturated probabilities.

    When the output is a softmax computed in the model's forward, its log is the log-softmax of that
    softmax's input (exact, no underflow: a probability that rounds to 0 keeps its gradient); otherwise it
    is log(max(output, smallest normal float)). Same predictions as the model.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _SoftmaxCalls() as calls:
            out = self.model(x)
        for produced, log_softmax, args, kwargs in reversed(calls.calls):
            if produced is out:
                return log_softmax(*args, **kwargs)
        return torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))


def verify_examples(model, x, x_adv, y, broken_by, eps, norm, votes: int = 1) -> None:
    """Every claimed adversarial example must be in the ball, in [0,1] and misclassified.

    votes > 1 (a randomized model): misclassified means misclassified by the majority over `votes`
    forward passes, the vote `orchestrate` took when the attack returned the example (that vote is
    its verification; a second vote would be a second sample of the same random variable, and
    requiring both would bias the count towards the model), so only the ball and the box are
    re-checked here.
    """
    size = perturbation_norm(x_adv - x, norm)
    bad_ball = (size > eps + BALL_TOL).nonzero().squeeze(1).tolist()
    bad_box = ((x_adv < 0) | (x_adv > 1)).flatten(1).any(1).nonzero().squeeze(1).tolist()
    bad_label = []
    if votes == 1:
        claimed = torch.tensor([b is not None for b in broken_by], device=y.device)
        bad_label = (claimed & (model(x_adv).argmax(1) == y)).nonzero().squeeze(1).tolist()
    problems = {"outside the eps ball": bad_ball, "outside [0,1]": bad_box,
                "claimed adversarial but correctly classified": bad_label}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise RuntimeError(f"autoattack returned invalid adversarial examples (chunk-local "
                           f"indices): {problems}; max {norm} perturbation {size.max().item():.6g} "
                           f"vs eps {eps}")


def cuda_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def autoattack_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     norm: str = "Linf", version: str = "standard",
                     attacks: Optional[Sequence[str]] = None, seed: int = 0,
                     device=None, on_stage: Optional[StageCallback] = None, return_adv: bool = False):
    """Attack one chunk as one batch. Per example: "clean" (misclassified without attack), the name
    of the first attack that fooled it, or None (robust). eps in [0,1] pixel units; `seed` is set
    on every attack object before it runs (pass `chunk_seed(run_seed, chunk_index)`).

    Runs in eval mode with parameters frozen (FAB calls .backward()), restoring both afterwards;
    the global torch RNG (which the reference attacks reseed) is restored too. version="rand" is for
    randomized models: APGD-CE and APGD-DLR with EOT (RAND_EOT gradient samples per step), the global
    RNG seeded with `seed` first (so the model's own randomness is reproducible), and every decision a
    majority over RAND_VOTES forward passes, which verifies each returned example (see `verify_examples`).
    `on_stage(stage, robust_left, n)` reports each stage as it finishes (progress bars).
    `return_adv`: return (broken_by, x_adv on the CPU), x_adv holding each broken example's adversarial
    image (verified) and the clean image elsewhere.
    """
    device = torch.device(device) if device is not None else model_device(model, x.device)
    if len(x) == 0:
        return ([], x.detach().cpu()) if return_adv else []
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"autoattack inputs must be in [0,1] (got [{x.min().item():.3g}, "
                        f"{x.max().item():.3g}]); normalise inside the model, not the data")
    x, y = x.detach().to(device).float(), y.detach().to(device).long()
    aa = build_autoattack(model, eps, norm, version, attacks, device, seed)
    votes = votes_for(version)
    with eval_mode(model), frozen_params(model), torch.no_grad(), \
            torch.random.fork_rng(devices=cuda_devices(device)):
        if votes > 1:
            _seed_global_rng(seed, device)
        broken_by, x_adv = orchestrate(aa, x, y, seed, votes, on_stage)
        verify_examples(model, x, x_adv, y, broken_by, eps, norm, votes)
    return (broken_by, x_adv.cpu()) if return_adv else broken_by


def _seed_global_rng(seed: int, device: torch.device) -> None:
    torch.random.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                   norm: str = "Linf", version: str = "standard",
                   attacks: Optional[Sequence[str]] = None, seed: int = 0, chunk_size: int = 100,
                   device=None, progress: Optional[Callable[[int, int], None]] = None,
                   bar: Optional[bool] = None) -> List[Optional[str]]:
    """AutoAttack over all of x, chunk by chunk (chunk i seeded with chunk_seed(seed, i)).
    progress(done_examples, total_examples) is called after each chunk. `bar` (None:
    `rayrobust.progress.progress_enabled()`) draws a bar over the images (img/s, ETA) showing the robust
    points left after each attack stage."""
    from ..progress import AttackBar

    _resolve_attacks(version, attacks)  # fail fast, before the first chunk
    broken_by: List[Optional[str]] = []
    with AttackBar(len(x), attacks_for(version, attacks), attack_label(version, attacks), enabled=bar) as shown:
        for i, (start, stop) in enumerate(chunk_plan(len(x), chunk_size)):
            chunk = autoattack_chunk(model, x[start:stop], y[start:stop], eps=eps, norm=norm,
                                     version=version, attacks=attacks, seed=chunk_seed(seed, i), device=device,
                                     on_stage=shown.stage if shown.enabled else None)
            broken_by += chunk
            shown.chunk(chunk)
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
