"""Hyperparameter search of the defenses (Ray Tune + Optuna) and the HTML report.

`run_tune(cfg)` / `resume_tune(run_dir)` live in `rayrobust.tune.search`, `write_report(run_dir)` in
`rayrobust.tune.report`; this package imports neither eagerly (the config module imports
`TuneConfig` from here).
"""
from .config import TuneConfig, parse_space

__all__ = ["TuneConfig", "parse_space"]
