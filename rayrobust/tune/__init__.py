"""Hyperparameter search of the defenses (Ray Tune + Optuna) and the HTML report.

`run_tune(cfg)` / `resume_tune(run_dir)` live in `rayrobust.tune.search`, which drives the modules of
one search: `trial` (the trainable and the parameters it sets), `grading` (each epoch's strong-attack
grade), `study` (the Optuna study in the run's storage) and `selection` (Pareto front, final AutoAttack,
summaries). `write_report(run_dir)` is in `rayrobust.tune.report`. This package imports none of them
eagerly (the config module imports `TuneConfig` from here).
"""
from .config import TuneConfig, parse_space

__all__ = ["TuneConfig", "parse_space"]
