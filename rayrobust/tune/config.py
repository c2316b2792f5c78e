"""`TuneConfig`: the `tune:` section of an experiment config (search space, budget, objective).

The search space names the knobs of docs/methods.md "Search space"; each has a fixed valid range and
maps onto the experiment config as follows:

| name               | kind                   | valid range        | methods     | sets                                              |
|--------------------|------------------------|--------------------|-------------|---------------------------------------------------|
| `n_clusters`       | int                    | 1..10              | clustr, srd | `train.method_args.clustr.k` and `semantic.k_max` |
| `repulsion_margin` | float (log by default) | 0.05..2.0          | drp, drp_at | `train.method_args.<drp or drp_at>.margin`        |
| `train_eps`        | float, x `eval.eps`    | 0.5..1.5           | adversarial | `train.eps = train_eps * eval.eps`                |
| `method`           | categorical            | registered methods | -           | `train.method`                                    |

("adversarial": every method that trains on adversarial examples, `Method.adversarial`; not `standard`,
`saturated`, `drp` or `clustr`.) A parameter is conditional on the method: a trial is suggested only the
parameters of the method it trains (`ConditionalSpace`, Optuna's define-by-run), and a parameter that
applies to none of the searched methods is a configuration error.

YAML:

    tune:
      space:
        repulsion_margin: {low: 0.1, high: 1.0, log: true}
        train_eps: {low: 0.5, high: 1.5}
        method: {choices: [drp, drp_at]}
      num_samples: 8
      optuna_storage: postgresql://user:password@db-host/optuna   # optional; default <run_dir>/optuna.journal

Every check names the field, the value and the fix (`ConfigError`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


ADVERSARIAL = "adversarial"  # a parameter of every method that trains on adversarial examples (Method.adversarial)

# name -> (kind, valid low, valid high, default log scale, the methods it applies to: names, ADVERSARIAL or None (all))
PARAMS: Dict[str, tuple] = {
    "n_clusters": ("int", 1, 10, False, ("clustr", "srd")),
    "repulsion_margin": ("float", 0.05, 2.0, True, ("drp", "drp_at")),
    "train_eps": ("float", 0.5, 1.5, False, ADVERSARIAL),
    "method": ("categorical", None, None, False, None),
}


def applies(name: str, method: str) -> bool:
    """Whether search parameter `name` is a knob of `method` (conditional parameters are suggested only then)."""
    methods = PARAMS[name][4]
    if methods == ADVERSARIAL:
        from ..methods import METHODS

        return bool(getattr(METHODS.get(method), "adversarial", False))
    return methods is None or method in methods


def applies_to(name: str) -> str:
    """The methods parameter `name` applies to, in words (for messages)."""
    methods = PARAMS[name][4]
    if methods == ADVERSARIAL:
        return "the methods that train on adversarial examples"
    return ", ".join(methods) if methods else "every method"


@dataclass(frozen=True)
class ParamSpec:
    """One validated search dimension."""

    name: str
    kind: str  # int, float or categorical
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Optional[List[Any]] = None

    def suggest(self, trial):
        """Ask an Optuna trial for this dimension's value (define-by-run)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def distribution(self):
        """The Optuna distribution of this dimension."""
        import optuna

        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log)


def _default_space() -> Dict[str, Any]:
    return {"train_eps": {"low": 0.5, "high": 1.5}}  # the knob every method has


def parse_space(space: Any) -> List[ParamSpec]:
    """Validate a `tune.space` mapping; return its dimensions in a fixed (sorted) order."""
    _check(isinstance(space, dict), f"tune.space={space!r} must be a mapping of parameter name -> "
                                    f"{{low, high[, log]}} or {{choices: [...]}}; parameters: {', '.join(PARAMS)}")
    _check(len(space) > 0, "tune.space is empty: a search needs at least one parameter; "
                           f"add one of {', '.join(PARAMS)} (e.g. tune.space.train_eps: {{low: 0.5, high: 1.5}})")
    specs = []
    for name in sorted(space):
        spec = space[name]
        _check(name in PARAMS, f"tune.space.{name}: unknown parameter {name!r}; valid parameters: {', '.join(PARAMS)}")
        kind, lo_valid, hi_valid, log_default, _ = PARAMS[name]
        where = f"tune.space.{name}"
        _check(isinstance(spec, dict), f"{where}={spec!r} must be a mapping, e.g. "
                                       + ("{choices: [drp, drp_at]}" if kind == "categorical" else f"{{low: {lo_valid}, high: {hi_valid}}}"))
        if kind == "categorical":
            _check(set(spec) <= {"choices"}, f"{where}: unknown key(s) {sorted(set(spec) - {'choices'})}; use {{choices: [...]}}")
            choices = spec.get("choices")
            _check(isinstance(choices, list) and len(choices) >= 1,
                   f"{where}.choices={choices!r} must be a non-empty list of method names")
            from ..methods import list_methods

            valid = list_methods()
            unknown = [c for c in choices if c not in valid]
            _check(not unknown, f"{where}.choices: unknown method(s) {unknown}; registered methods: {', '.join(valid)}")
            _check(len(set(choices)) == len(choices), f"{where}.choices={choices} lists a method twice")
            specs.append(ParamSpec(name, kind, choices=list(choices)))
            continue
        allowed = {"low", "high", "log"}
        _check(set(spec) <= allowed, f"{where}: unknown key(s) {sorted(set(spec) - allowed)}; use low, high and optionally log")
        _check("low" in spec and "high" in spec, f"{where}={spec} needs both low and high (valid range {lo_valid}..{hi_valid})")
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", log_default))
        for key, v in (("low", low), ("high", high)):
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                   f"{where}.{key}={v!r} must be a number in {lo_valid}..{hi_valid}")
            if kind == "int":
                _check(float(v).is_integer(), f"{where}.{key}={v} must be an integer in {lo_valid}..{hi_valid}")
            _check(lo_valid <= v <= hi_valid,
                   f"{where}.{key}={v} is outside the valid range {lo_valid}..{hi_valid}; choose bounds inside it")
        _check(low <= high, f"{where}: low={low} > high={high}; swap them")
        _check(not (log and low <= 0), f"{where}: log scale needs low > 0 (got {low})")
        specs.append(ParamSpec(name, kind, int(low) if kind == "int" else float(low),
                               int(high) if kind == "int" else float(high), log))
    return specs


class ConditionalSpace:
    """The search space as an Optuna define-by-run function: `method` first (when searched), then each other
    dimension only for the methods it applies to (`PARAMS`), so a DRP trial is never given a cluster count
    and the sampler models each knob on the trials that used it. Picklable (saved with the searcher)."""

    def __init__(self, specs: List[ParamSpec], fixed_method: str):
        self.specs = list(specs)
        self.fixed_method = fixed_method

    def methods(self) -> List[str]:
        """The methods the search can train."""
        for spec in self.specs:
            if spec.name == "method":
                return list(spec.choices)
        return [self.fixed_method]

    def __call__(self, trial) -> None:
        method = self.fixed_method
        for spec in self.specs:
            if spec.name == "method":
                method = spec.suggest(trial)
        for spec in self.specs:
            if spec.name != "method" and applies(spec.name, method):
                spec.suggest(trial)

    def distributions(self, names) -> Dict[str, Any]:
        """The Optuna distributions of the named dimensions."""
        return {s.name: s.distribution() for s in self.specs if s.name in names}


RDB_SCHEMES = ("sqlite", "postgresql", "mysql")  # database URLs tune.optuna_storage accepts (with +driver)


def redact(url: str) -> str:
    """A database URL with its password hidden (for messages and summaries)."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def check_optuna_storage(url: Any) -> None:
    """tune.optuna_storage must be null or a database URL Optuna can keep a study in."""
    if url is None:
        return
    hint = ("use sqlite:///path/study.db, postgresql://user:password@host/database or mysql://..., or leave "
            "tune.optuna_storage unset to keep the study in <run_dir>/optuna.journal")
    _check(isinstance(url, str) and "://" in url,
           f"tune.optuna_storage={url!r} is not a database URL; {hint}")
    scheme = url.split("://", 1)[0].lower()
    _check(scheme.split("+", 1)[0] in RDB_SCHEMES,
           f"tune.optuna_storage={redact(url)!r}: unknown database scheme {scheme + '://'!r}; {hint}")
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as e:
        raise ConfigError(f"tune.optuna_storage={redact(url)!r} is not a valid database URL "
                          f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); {hint}") from None
    if parsed.get_backend_name() == "sqlite":
        _check(parsed.database not in (None, "", ":memory:"),
               f"tune.optuna_storage={url!r} names no database file (an in-memory study does not survive the "
               "driver); write sqlite:///path/study.db")
    else:
        _check(bool(parsed.host) and bool(parsed.database),
               f"tune.optuna_storage={redact(url)!r} needs a host and a database, e.g. "
               f"{scheme}://user:password@host/database")


@dataclass
class TuneConfig:
    space: Dict[str, Any] = field(default_factory=_default_space)  # parameter -> {low, high[, log]} or {choices}; see module doc
    num_samples: int = 8  # trials in the search (Optuna suggestions), >= 1
    max_concurrent_trials: Optional[int] = None  # None = cluster CPUs // (train.num_workers * train.cpus_per_worker)
    seed: int = 0  # Optuna sampler seed (TPE): same seed, same suggestions
    val_n: int = 256  # images of the held-out validation split (data.val_size) every trial is graded on
    asha: bool = True  # ASHA early stopping on the robust objective (per epoch)
    grace_period: int = 1  # ASHA: epochs every trial trains before it can be stopped
    reduction_factor: int = 2  # ASHA: keep 1/reduction_factor of the trials at each rung
    final_top_k: int = 3  # Pareto-front configurations re-evaluated with full AutoAttack on the test set
    masking_gap: float = 0.2  # flag a trial whose PGD-CE accuracy exceeds its APGD accuracy by more than this
    # Where the Optuna study lives: None = <run_dir>/optuna.journal in the run's storage (worked on by the
    # driver, copied there after every trial); or a database URL: sqlite:///path/study.db, postgresql://...,
    # mysql://... (any SQLAlchemy URL with a driver installed)
    optuna_storage: Optional[str] = None

    def __post_init__(self) -> None:
        parse_space(self.space)
        _check(self.num_samples >= 1, f"tune.num_samples={self.num_samples} must be >= 1 (trials in the search)")
        _check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
               f"tune.max_concurrent_trials={self.max_concurrent_trials} must be >= 1 or null (from the cluster's CPUs)")
        _check(self.val_n >= 1, f"tune.val_n={self.val_n} must be >= 1 (validation images per trial)")
        _check(self.grace_period >= 1, f"tune.grace_period={self.grace_period} must be >= 1 epoch")
        _check(self.reduction_factor >= 2, f"tune.reduction_factor={self.reduction_factor} must be >= 2")
        _check(self.final_top_k >= 1, f"tune.final_top_k={self.final_top_k} must be >= 1")
        _check(0 < self.masking_gap <= 1, f"tune.masking_gap={self.masking_gap} must be in (0, 1] (e.g. 0.2)")
        check_optuna_storage(self.optuna_storage)

    def params(self) -> List[ParamSpec]:
        return parse_space(self.space)
