"""`rayrobust tune`: Optuna on Ray Tune over the knobs of the defenses, graded by a strong attack.

Layout of a search run directory (`cfg.run_dir`: a local path or a storage URI, s3://bucket/run, gs://...,
file://...; every file below is written atomically through `rayrobust.location`):

    tune_config.json        the experiment config the search was started with (what --resume reads)
    optuna.journal          the Optuna study (JournalStorage) unless tune.optuna_storage names a database:
                            `rayrobust dashboard <run_dir>` serves optuna-dashboard over it (rayrobust.dashboard)
    tune/                   the Tune experiment (RunConfig(storage_path=<run_dir>, name="tune"): experiment
                            state, per-trial TensorBoard logs): `tensorboard --logdir <run_dir>/tune`
    trials/<trial_id>/      one Ray Train run per trial: checkpoints/epoch_NNN/, metrics.jsonl, params.json,
                            val/epoch_NNN.json (the per-epoch grading), final_eval.json (if selected),
                            stop.json (if Tune stopped the trial early: after which graded epoch)
    tune_summary.json       every trial, the Pareto front, the final AutoAttack table
    summary.json            the same rows in the `rayrobust pipeline` summary format

No stage needs a shared filesystem: the Tune experiment lives in the run's storage (`Tuner.restore(<run_dir>/tune)`
resumes it from any node), the driver works on the Optuna journal in a local file (a temporary copy when
the run is remote) and copies it to `<run_dir>/optuna.journal` after every trial and with every Tune
experiment checkpoint (`StudyStorage`, `StudySync`), and `--resume` downloads it from there. With
`tune.optuna_storage: postgresql://...` (or sqlite:///..., mysql://...) the study lives in that database
instead, named `rayrobust:<run_dir>`.

Design (our choices, stated):
- A trial (`Trial`, a class trainable) holds no CPU (`tune.with_resources(..., {"CPU": 0, "memory": 1})`): it
  starts `rayrobust.train.fit` (a Ray Train V2 `TorchTrainer`, whose workers hold the CPUs/GPUs) in
  a background thread and grades every epoch checkpoint as it appears, one Tune step per epoch.
  A trial Tune stops (ASHA) writes `trials/<id>/stop.json` in its cleanup and waits there until its
  workers have returned at the next epoch boundary and Ray Train has removed their placement group:
  a stopped trial frees its CPUs/GPUs before its actor exits, with no help from the Ray state API.
  `max_concurrent_trials` defaults to the cluster's CPUs // (num_workers x cpus_per_worker).
- Grading: clean accuracy and APGD-CE then APGD-T (pyautoattack, each on the points the previous
  left robust) at `eval.eps` on the first `tune.val_n` images of the held-out validation split
  (fixed: the split is seeded by `train.seed`, which the search does not vary). PGD-20 on
  cross-entropy is measured on the same images for contrast only. Flags: zero input gradients,
  softmax outputs, non-determinism, robust above clean, and PGD-CE above APGD by more than
  `tune.masking_gap` (a weak attack beating a strong one signals gradient masking).
- Objectives: Optuna study with two maximised values, clean accuracy and `robust_objective` =
  APGD robust accuracy, or 0 (the worst) for a flagged trial. ASHA stops trials on
  `robust_objective` alone (Optuna's multi-objective samplers take no intermediate values).
  Raw numbers and flags are Optuna user attributes of every trial.
- Selection: the Pareto front (clean, robust) of the unflagged trials that trained all epochs
  (all unflagged trials if none did), at most `tune.final_top_k` by robust accuracy, re-evaluated
  with full AutoAttack (standard version) on the test set with `cfg.eval`.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

from ray.tune import Callback

from ..config import ExperimentConfig, config_from_dict
from ..errors import ConfigError
from ..io import read_json, write_json
from ..location import Location, Where, as_location, check_writable
from ..progress import Bar
from .config import applies, applies_to
from .selection import finish
from .study import ASHA_METRIC, EXPERIMENT, OBJECTIVES, RecordingOptunaSearch, StudyStorage, StudySync
from .trial import Trial, search_space


def check_search(cfg: ExperimentConfig) -> None:
    """Cross-section checks that TuneConfig alone cannot make."""
    tc = cfg.tune
    methods = search_space(cfg).methods()
    for spec in tc.params():
        if spec.name != "method" and not any(applies(spec.name, m) for m in methods):
            where = "tune.space.method.choices" if len(methods) > 1 else "train.method"
            raise ConfigError(f"tune.space.{spec.name} applies to {applies_to(spec.name)}, and the search "
                              f"trains only {', '.join(methods)} ({where}); remove tune.space.{spec.name} or "
                              f"search a method it applies to")
        if spec.name == "train_eps" and spec.high * cfg.eval.eps > 1:
            raise ConfigError(f"tune.space.train_eps.high={spec.high} times eval.eps={cfg.eval.eps} exceeds 1; "
                              "lower the bound or eval.eps")
    if cfg.data.val_size < tc.val_n:
        raise ConfigError(f"tune.val_n={tc.val_n} exceeds data.val_size={cfg.data.val_size}: trials are graded on "
                          "held-out validation images; raise data.val_size or lower tune.val_n")
    if cfg.eval.n_autoattack < 1:
        raise ConfigError("eval.n_autoattack=0: the selected configurations are re-evaluated with AutoAttack; "
                          "set eval.n_autoattack >= 1")


def max_concurrent(cfg: ExperimentConfig) -> int:
    """tune.max_concurrent_trials, else how many trials' Ray Train workers fit in the cluster at once."""
    if cfg.tune.max_concurrent_trials is not None:
        return cfg.tune.max_concurrent_trials
    from ..raycluster import cluster_cpus, cluster_gpus, resolve_use_gpu

    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    n = cluster_cpus() // per_trial
    if resolve_use_gpu(cfg.train.use_gpu)[0]:
        n = min(n, cluster_gpus() // cfg.train.num_workers)
    return max(1, n)


class TrialBar(Callback):
    """Tune callback on the driver: when interactive (`progress_enabled()`), a bar over the trials finished
    (trial/s, ETA), with how many run now. A resumed search counts the trials it restored as finished."""

    FINISHED = ("TERMINATED", "ERROR")

    def __init__(self, total: int):
        self.total = total
        self.bar: Optional[Bar] = None

    def _show(self, trials, extra: Optional[str] = None) -> None:
        finished = {t.trial_id for t in trials if t.status in self.FINISHED}
        if extra is not None:
            finished.add(extra)
        running = sum(1 for t in trials if t.status == "RUNNING" and t.trial_id not in finished)
        if self.bar is None:
            self.bar = Bar(total=self.total, desc="trials", unit="trial", initial=len(finished))
        self.bar.set_count(len(finished))
        self.bar.postfix(f"{running} running")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials, trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials, trial.trial_id)

    def on_experiment_end(self, trials, **info):
        if self.bar is not None:
            self._show(trials)
            self.bar.close()

    def __getstate__(self) -> Dict[str, Any]:  # saved with the experiment state: the bar stays on the driver
        return {"total": self.total, "bar": None}


def _trainable(cfg: ExperimentConfig, run: Location):
    from ray import tune

    fn = tune.with_parameters(Trial, base=cfg.to_dict(), run_dir=run.uri)
    # The trial itself holds no CPU or GPU (its TorchTrainer workers do); Tune refuses an empty
    # request, so the trial asks for one byte of memory instead.
    return tune.with_resources(fn, {"CPU": 0, "memory": 1})


def _tuner(cfg: ExperimentConfig, run: Location, study_store: StudyStorage):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    space = search_space(cfg)
    import optuna

    study = optuna.create_study(study_name=study_store.study_name, storage=study_store.storage(),
                                directions=["maximize", "maximize"], load_if_exists=True)
    with warnings.catch_warnings():  # set_metric_names is marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(OBJECTIVES)  # objective names shown by optuna-dashboard
    study_store.push()
    searcher = RecordingOptunaSearch(study_store, space=space, metric=OBJECTIVES, mode=["max", "max"], seed=tc.seed)
    if tc.asha:
        scheduler = ASHAScheduler(metric=ASHA_METRIC, mode="max", time_attr="training_iteration",
                                  max_t=cfg.train.epochs, grace_period=min(tc.grace_period, cfg.train.epochs),
                                  reduction_factor=tc.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        _trainable(cfg, run),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=tc.num_samples,
                                    max_concurrent_trials=max_concurrent(cfg)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=run.uri, verbose=1,
                                  callbacks=[StudySync(study_store), TrialBar(tc.num_samples)],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _prepare_ray(cfg: ExperimentConfig) -> None:
    from ..raycluster import ensure_ray

    # Experiment state is written at least every few seconds, so a killed driver loses little.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    ensure_ray(cfg.ray_address)


def run_tune(cfg: ExperimentConfig) -> Dict[str, Any]:
    """Run the search of `cfg.tune` in `cfg.run_dir` (a local path or a storage URI), then re-evaluate the
    selected trials. Every input is checked before anything is written."""
    from ray import tune

    check_search(cfg)
    run = cfg.run_location()
    check_writable(run)  # a wrong bucket, endpoint or credential fails here
    exp = run / EXPERIMENT
    if tune.Tuner.can_restore(exp.uri):
        raise ConfigError(f"{run.uri} already holds a search; continue it with `rayrobust tune --resume {run.uri}` "
                          "or choose another run_dir (--set run_dir=...)")
    from ..train.ray_train import preflight_data

    preflight_data(cfg)
    study_store = StudyStorage(run, cfg.tune.optuna_storage)
    study_store.storage()  # an unreachable database fails here
    write_json(run / "tune_config.json", cfg.to_dict())
    _prepare_ray(cfg)
    print(f"== search: {cfg.tune.num_samples} trial(s), {max_concurrent(cfg)} at a time; "
          f"Optuna study in {study_store.describe()}; Tune experiment in {exp.uri}", flush=True)
    grid = _tuner(cfg, run, study_store).fit()
    return finish(cfg, run, grid, study_store)


def resume_tune(run_dir: Where) -> Dict[str, Any]:
    """Continue an interrupted search (local path or storage URI): finished trials are kept, unfinished
    ones continue; a finished search is summarised again without running any trial."""
    from ray import tune

    run = as_location(run_dir)
    try:
        raw = read_json(run / "tune_config.json")
    except FileNotFoundError:
        raise ConfigError(f"{run.uri} holds no search (no tune_config.json); start one with "
                          "`rayrobust tune --config ...`") from None
    except ValueError:
        raise ConfigError(f"{(run / 'tune_config.json').uri} is not valid JSON; the search cannot be resumed") from None
    cfg = config_from_dict(raw)
    exp = run / EXPERIMENT
    if not tune.Tuner.can_restore(exp.uri):
        raise ConfigError(f"{exp.uri} has no Tune experiment state to resume (the search was killed before its first "
                          f"checkpoint); delete {run.uri} and start again")
    study_store = StudyStorage(run, cfg.tune.optuna_storage)
    study_store.storage()  # the journal is downloaded from the run's storage here
    _prepare_ray(cfg)
    print(f"== resuming the search in {exp.uri} (Optuna study in {study_store.describe()})", flush=True)
    tuner = tune.Tuner.restore(exp.uri, trainable=_trainable(cfg, run), resume_unfinished=True,
                               resume_errored=True, restart_errored=False)
    grid = tuner.fit()
    return finish(cfg, run, grid, study_store)
