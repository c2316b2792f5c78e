"""`rayrobust tune`: Optuna on Ray Tune over the knobs of the defenses, graded by a strong attack.

Layout of a search run directory (`cfg.run_dir`):

    tune_config.json        the experiment config the search was started with (what --resume reads)
    optuna.journal          the Optuna study (JournalStorage): `optuna-dashboard optuna.journal`
    tune/                   the Tune experiment (experiment state, per-trial TensorBoard logs):
                            `tensorboard --logdir <run_dir>/tune`
    trials/<trial_id>/      one Ray Train run per trial: checkpoints/, metrics.jsonl, params.json,
                            val/epoch_NNN.json (the per-epoch grading), final_eval.json (if selected)
    tune_summary.json       every trial, the Pareto front, the final AutoAttack table
    summary.json            the same rows in the `rayrobust pipeline` summary format

Design (our choices, stated):
- A trial is a function trainable holding no CPU (`tune.with_resources(..., {"CPU": 0, "memory": 1})`): it
  starts `rayrobust.train.fit` (a Ray Train V2 `TorchTrainer`, whose workers hold the CPUs/GPUs) in
  a background thread and grades every epoch checkpoint as it appears, reporting to Tune once per
  epoch. `max_concurrent_trials` defaults to the cluster's CPUs // (num_workers x cpus_per_worker).
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

import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from ray.tune.search.optuna import OptunaSearch

from ..config import ExperimentConfig, config_from_dict
from ..errors import ConfigError, RayRobustError
from ..io import provenance, write_json

EXPERIMENT = "tune"
STUDY = "rayrobust"
JOURNAL = "optuna.journal"
GRADING_ATTACKS = ["apgd-ce", "apgd-t"]
OBJECTIVES = ["clean_acc", "robust_objective"]  # the Optuna study's values, both maximised
ASHA_METRIC = "robust_objective"
PGD_CE_STEPS = 20
GRADING = ("clean, then APGD-CE and APGD-T (pyautoattack, cumulative) at eval.eps on the first "
           "tune.val_n held-out validation images; robust_objective = that accuracy, 0 if flagged")
USER_ATTRS = ("clean_acc", "robust_acc", "pgd_ce_acc", "robust_objective", "flagged", "flags", "epoch",
              "epochs_planned")


# ----------------------------------------------------------------------------------- parameters


def apply_params(base: Dict[str, Any], params: Dict[str, Any]) -> ExperimentConfig:
    """The experiment config of one trial: `base` (a config dict) with the search parameters set."""
    raw = json.loads(json.dumps(base))
    for name, value in params.items():
        if name == "n_clusters":
            raw["semantic"]["k_max"] = int(value)
            if "clustr_k" in raw["train"]:
                raw["train"]["clustr_k"] = int(value)
        elif name == "repulsion_margin":
            raw["train"]["repulsion_margin"] = float(value)
        elif name == "train_eps":
            raw["train"]["eps"] = float(value) * raw["eval"]["eps"]
        elif name == "method":
            raw["train"]["method"] = str(value)
        else:
            raise ConfigError(f"unknown search parameter {name!r}")
    return config_from_dict(raw)


def check_search(cfg: ExperimentConfig) -> None:
    """Cross-section checks that TuneConfig alone cannot make."""
    tc = cfg.tune
    for spec in tc.params():
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


# -------------------------------------------------------------------------------------- grading


def grade(decision: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
          seed: int = 0, masking_gap: float = 0.2) -> Dict[str, Any]:
    """Clean, APGD-CE + APGD-T and PGD-CE accuracy of `decision` on (x, y), with sanity flags."""
    from ..attacks import PGD, accuracy, robust_accuracy
    from ..attacks.autoattack import run_autoattack, summarize_autoattack
    from ..attacks.checks import (Flag, check_deterministic, check_robust_le_clean, check_softmax_output,
                                  check_zero_gradients, failed)
    from ..attacks.pgd import eval_mode

    t0 = time.perf_counter()
    with eval_mode(decision):
        clean = accuracy(decision, x, y, len(x))
        broken_by = run_autoattack(decision, x, y, eps=eps, norm=norm, version="custom", attacks=GRADING_ATTACKS,
                                   seed=seed, chunk_size=len(x))
        per_attack = summarize_autoattack(broken_by, GRADING_ATTACKS)
        pgd = PGD(decision, eps=eps, norm=norm, steps=PGD_CE_STEPS, restarts=1, seed=seed)
        pgd_ce = robust_accuracy(decision, pgd, x, y, len(x))
        robust = per_attack["robust"]
        flags = [check_zero_gradients(decision, x, y), check_softmax_output(decision, x),
                 check_deterministic(decision, x),
                 check_robust_le_clean(clean, {"apgd-ce+apgd-t": robust, f"pgd{PGD_CE_STEPS}-ce": pgd_ce}),
                 Flag("pgd_ce_above_apgd", pgd_ce - robust <= masking_gap,
                      f"PGD-{PGD_CE_STEPS}-CE {pgd_ce:.4f} vs APGD-CE+APGD-T {robust:.4f} (gap tolerance {masking_gap:g})")]
    raised = failed(flags)
    return {"n": len(x), "eps": eps, "norm": norm, "seed": seed, "clean_acc": clean, "robust_acc": robust,
            "robust_attack": "APGD-CE + APGD-T (pyautoattack)", "per_attack": per_attack,
            "pgd_ce_acc": pgd_ce, "pgd_ce_attack": f"PGD-{PGD_CE_STEPS} on cross-entropy, random start (contrast only)",
            "robust_objective": 0.0 if raised else robust, "flagged": bool(raised), "flags": raised,
            "checks": [f.to_dict() for f in flags], "seconds": time.perf_counter() - t0}


def _decision_from_checkpoint(path: Path):
    from ..checkpoint import load_checkpoint, model_from_checkpoint
    from ..methods import create_method, method_kwargs

    payload = load_checkpoint(path)
    model = model_from_checkpoint(path)
    kwargs = method_kwargs(payload["config"]["train"])
    kwargs["num_classes"] = payload.get("model_meta", {}).get("num_labels") or kwargs.get("num_classes", 10)
    method = create_method(payload["config"]["train"]["method"], **kwargs)
    if payload.get("method_state"):
        method.load_state_dict(payload["method_state"])
    return method.decision(model).eval(), payload


def validation_subset(cfg: ExperimentConfig):
    """The fixed grading images: the first tune.val_n of the held-out split (seeded by train.seed)."""
    from ..data import load_dataset
    from ..train.loop import train_val_split

    ds = load_dataset(cfg.data.name, "train", root=cfg.data.root, download=cfg.data.download, limit=cfg.data.train_limit)
    split = train_val_split(ds.x, ds.y, cfg.data.val_size, seed=cfg.train.seed)
    return split.x_val[:cfg.tune.val_n].contiguous(), split.y_val[:cfg.tune.val_n].contiguous()


def grade_checkpoint(cfg: ExperimentConfig, path: Path, x: torch.Tensor, y: torch.Tensor) -> Dict[str, Any]:
    """Grade one epoch checkpoint (cached next to the trial as val/epoch_NNN.json, keyed by its sha256)."""
    from ..io import sha256_file

    cache = path.parent.parent / "val" / (path.stem + ".json")
    digest = sha256_file(path)
    if cache.exists():
        try:
            old = json.loads(cache.read_text())
            if old.get("checkpoint_sha256") == digest:
                return old
        except (json.JSONDecodeError, OSError):
            pass
    decision, payload = _decision_from_checkpoint(path)
    res = grade(decision, x, y, eps=cfg.eval.eps, norm=cfg.eval.norm, seed=cfg.eval.seed, masking_gap=cfg.tune.masking_gap)
    hist = payload.get("history") or [{}]
    res.update({"epoch": int(payload["epoch"]), "checkpoint": str(path), "checkpoint_sha256": digest,
                "train_loss": hist[-1].get("loss")})
    write_json(cache, res)
    return res


# ---------------------------------------------------------------------------------------- trial


def _trial(config: Dict[str, Any], base: Optional[Dict[str, Any]] = None, run_dir: Optional[str] = None) -> None:
    """One Tune trial: Ray Train fit in a background thread, one Tune report per graded epoch."""
    from ray import tune

    from ..checkpoint import checkpoint_name
    from ..train import fit

    torch.set_num_threads(1)
    trial_id = tune.get_context().get_trial_id()
    params = {k: v for k, v in config.items()}
    cfg = apply_params(base, params)
    tdir = Path(run_dir) / "trials" / trial_id
    write_json(tdir / "params.json", {"trial_id": trial_id, "params": params, "config": cfg.to_dict()})
    x, y = validation_subset(cfg)
    box: Dict[str, Any] = {}

    def work():
        try:
            box["result"] = fit(cfg, tdir)
        except BaseException as e:  # re-raised in the trial's thread below
            box["error"] = e

    worker = threading.Thread(target=work, name=f"fit-{trial_id}", daemon=True)
    worker.start()
    for epoch in range(1, cfg.train.epochs + 1):
        path = tdir / "checkpoints" / checkpoint_name(epoch)
        while not path.exists():
            if not worker.is_alive() and not path.exists():
                raise box.get("error") or RayRobustError(f"training of trial {trial_id} ended without {path.name}")
            time.sleep(0.5)
        res = grade_checkpoint(cfg, path, x, y)
        tune.report({"epoch": epoch, "epochs_planned": cfg.train.epochs, "clean_acc": res["clean_acc"],
                     "robust_acc": res["robust_acc"], "pgd_ce_acc": res["pgd_ce_acc"],
                     "robust_objective": res["robust_objective"], "flagged": int(res["flagged"]),
                     "flags": ",".join(res["flags"]), "train_loss": res.get("train_loss") or 0.0,
                     "method": cfg.train.method, "grading_seconds": res["seconds"]})
    worker.join()
    if "error" in box:
        raise box["error"]


class RecordingOptunaSearch(OptunaSearch):
    """OptunaSearch that also stores each trial's raw numbers and flags as Optuna user attributes."""

    def on_trial_complete(self, trial_id, result=None, error=False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            try:
                ot_trial.set_user_attr("tune_trial_id", trial_id)
                for key in USER_ATTRS:
                    if result and key in result:
                        ot_trial.set_user_attr(key, result[key])
            except Exception:  # the trial was already finished in the storage (a resumed search)
                pass
        super().on_trial_complete(trial_id, result=result, error=error)


def journal_storage(run_dir: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(run_dir).resolve() / JOURNAL)))


def _trainable(cfg: ExperimentConfig, run_dir: Path):
    from ray import tune

    fn = tune.with_parameters(_trial, base=cfg.to_dict(), run_dir=str(run_dir))
    # The trial itself holds no CPU or GPU (its TorchTrainer workers do); Tune refuses an empty
    # request, so the trial asks for one byte of memory instead.
    return tune.with_resources(fn, {"CPU": 0, "memory": 1})


def _tuner(cfg: ExperimentConfig, run_dir: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    space = {p.name: p.distribution() for p in tc.params()}
    import optuna

    study = optuna.create_study(study_name=STUDY, storage=journal_storage(run_dir), directions=["maximize", "maximize"],
                                load_if_exists=True)
    with warnings.catch_warnings():  # set_metric_names is marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(OBJECTIVES)  # objective names shown by optuna-dashboard
    searcher = RecordingOptunaSearch(space=space, metric=OBJECTIVES, mode=["max", "max"], seed=tc.seed,
                                     study_name=STUDY, storage=journal_storage(run_dir))
    if tc.asha:
        scheduler = ASHAScheduler(metric=ASHA_METRIC, mode="max", time_attr="training_iteration",
                                  max_t=cfg.train.epochs, grace_period=min(tc.grace_period, cfg.train.epochs),
                                  reduction_factor=tc.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        _trainable(cfg, run_dir),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=tc.num_samples,
                                    max_concurrent_trials=max_concurrent(cfg)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(run_dir), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _prepare_ray(cfg: ExperimentConfig) -> None:
    from ..raycluster import ensure_ray

    # Experiment state is written at least every few seconds, so a killed driver loses little.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    ensure_ray(cfg.ray_address)


def run_tune(cfg: ExperimentConfig) -> Dict[str, Any]:
    """Run the search of `cfg.tune` in `cfg.run_dir`, then re-evaluate the selected trials."""
    from ray import tune

    check_search(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    if (run_dir / EXPERIMENT).exists() and tune.Tuner.can_restore(str(run_dir / EXPERIMENT)):
        raise ConfigError(f"{run_dir} already holds a search; continue it with `rayrobust tune --resume {run_dir}` "
                          "or choose another run_dir (--set run_dir=...)")
    from ..train.ray_train import _preflight_data

    _preflight_data(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "tune_config.json", cfg.to_dict())
    _prepare_ray(cfg)
    print(f"== search: {cfg.tune.num_samples} trial(s), {max_concurrent(cfg)} at a time; "
          f"Optuna study in {run_dir / JOURNAL}; Tune experiment in {run_dir / EXPERIMENT}", flush=True)
    grid = _tuner(cfg, run_dir).fit()
    return finish(cfg, run_dir, grid)


def resume_tune(run_dir: str | Path) -> Dict[str, Any]:
    """Continue an interrupted search: finished trials are kept, unfinished ones continue."""
    from ray import tune

    run_dir = Path(run_dir).resolve()
    saved = run_dir / "tune_config.json"
    if not saved.exists():
        raise ConfigError(f"{run_dir} holds no search (no tune_config.json); start one with `rayrobust tune --config ...`")
    cfg = config_from_dict(json.loads(saved.read_text()))
    exp = run_dir / EXPERIMENT
    if not tune.Tuner.can_restore(str(exp)):
        raise ConfigError(f"{exp} has no Tune experiment state to resume (the search was killed before its first "
                          f"checkpoint); delete {run_dir} and start again")
    _prepare_ray(cfg)
    print(f"== resuming the search in {exp}", flush=True)
    tuner = tune.Tuner.restore(str(exp), trainable=_trainable(cfg, run_dir), resume_unfinished=True,
                               resume_errored=True, restart_errored=False)
    grid = tuner.fit()
    return finish(cfg, run_dir, grid)


# ------------------------------------------------------------------------------------ selection


def pareto_front(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows not dominated in (clean_acc, robust_acc), best robust first."""
    front = []
    for r in rows:
        dominated = any(o is not r and o["clean_acc"] >= r["clean_acc"] and o["robust_acc"] >= r["robust_acc"]
                        and (o["clean_acc"] > r["clean_acc"] or o["robust_acc"] > r["robust_acc"]) for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (-r["robust_acc"], -r["clean_acc"], r["trial_id"]))


def select(rows: List[Dict[str, Any]], top_k: int) -> List[Dict[str, Any]]:
    """Never a flagged trial; prefer trials that trained every epoch (not stopped by ASHA)."""
    ok = [r for r in rows if not r["flagged"] and r.get("status") == "TERMINATED"]
    full = [r for r in ok if r["epoch"] >= r["epochs_planned"]]
    return pareto_front(full or ok)[:top_k]


def _trial_rows(run_dir: Path, grid) -> List[Dict[str, Any]]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        params_file = run_dir / "trials" / trial_id / "params.json"
        params = json.loads(params_file.read_text())["params"] if params_file.exists() else dict(result.config or {})
        rows.append({
            "trial_id": trial_id, "params": params, "method": m.get("method"),
            "status": "ERROR" if result.error else "TERMINATED",
            "epoch": int(m.get("epoch", 0)), "epochs_planned": int(m.get("epochs_planned", 0)),
            "clean_acc": m.get("clean_acc"), "robust_acc": m.get("robust_acc"), "pgd_ce_acc": m.get("pgd_ce_acc"),
            "robust_objective": m.get("robust_objective"), "flagged": bool(m.get("flagged", 1)) if m else True,
            "flags": [f for f in str(m.get("flags", "")).split(",") if f] if m else ["no_result"],
            "error": str(result.error).splitlines()[0] if result.error else None,
        })
    return sorted(rows, key=lambda r: r["trial_id"])


def _close_orphans(run_dir: Path) -> int:
    """Optuna trials left RUNNING by a killed driver (never told): mark them FAIL, labelled."""
    import optuna

    storage = journal_storage(run_dir)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    n = 0
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        storage.set_trial_user_attr(t._trial_id, "orphaned", "asked by a search driver that was killed; its Tune trial was not kept")
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        n += 1
    return n


def finish(cfg: ExperimentConfig, run_dir: Path, grid) -> Dict[str, Any]:
    """Select the Pareto front, re-evaluate it with full AutoAttack, write tune_summary.json and summary.json."""
    from ..evaluation import evaluate_checkpoint
    from ..checkpoint import latest_valid_checkpoint
    from ..pipeline import format_table, summary_row

    rows = _trial_rows(run_dir, grid)
    orphans = _close_orphans(run_dir)
    chosen = select(rows, cfg.tune.final_top_k)
    final = []
    for r in chosen:
        tdir = run_dir / "trials" / r["trial_id"]
        ckpt = latest_valid_checkpoint(tdir / "checkpoints")
        tcfg = config_from_dict(json.loads((tdir / "params.json").read_text())["config"])
        print(f"== final AutoAttack: trial {r['trial_id']} ({r['method']}, {r['params']})", flush=True)
        res = evaluate_checkpoint(tcfg, ckpt, tdir / "final_eval.json", label=r["trial_id"])
        final.append({"trial_id": r["trial_id"], "params": r["params"], **summary_row(res),
                      "autoattack_per_attack": (res.get("autoattack") or {}).get("per_attack"),
                      "eval": str(tdir / "final_eval.json")})
    ec = cfg.eval
    attacks = {"grading": GRADING, "pgd_ce": f"PGD-{PGD_CE_STEPS} on cross-entropy (contrast only, never the objective)",
               "pgd": f"PGD-{ec.pgd_steps}, {ec.pgd_restarts} restart(s) (weaker than AutoAttack)",
               "autoattack": "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (pyautoattack)"}
    summary = {
        "kind": "tune", "dataset": cfg.data.name, "eps": ec.eps, "norm": ec.norm, "n_eval": ec.n_eval,
        "n_autoattack": ec.n_autoattack, "pgd_steps": ec.pgd_steps, "val_n": cfg.tune.val_n, "num_samples": cfg.tune.num_samples,
        "space": cfg.tune.space, "objectives": OBJECTIVES, "asha_metric": ASHA_METRIC if cfg.tune.asha else None,
        "storage": str(run_dir / JOURNAL), "study_name": STUDY, "experiment_dir": str(run_dir / EXPERIMENT),
        "attacks": attacks, "trials": rows, "pareto": [r["trial_id"] for r in pareto_front(
            [r for r in rows if not r["flagged"] and r["clean_acc"] is not None])],
        "selected": [r["trial_id"] for r in chosen], "final": final, "orphaned_optuna_trials": orphans,
        "provenance": provenance(config=cfg.to_dict(), seed=cfg.tune.seed),
    }
    write_json(run_dir / "tune_summary.json", summary)
    write_json(run_dir / "summary.json", {
        "kind": "tune", "dataset": cfg.data.name, "eps": ec.eps, "norm": ec.norm, "n_eval": ec.n_eval,
        "n_autoattack": ec.n_autoattack, "attacks": attacks,
        "rows": [{k: f[k] for k in ("trial_id", "method", "clean_acc", "pgd_acc", "autoattack_acc", "flags")} for f in final],
        "tune_summary": str(run_dir / "tune_summary.json"), "provenance": summary["provenance"]})
    _print_trials(rows)
    if final:
        print(format_table(final, pgd_steps=ec.pgd_steps, n_eval=ec.n_eval, n_aa=ec.n_autoattack, eps=ec.eps), flush=True)
    else:
        print("no unflagged trial finished: nothing re-evaluated", flush=True)
    print(f"summary: {run_dir / 'tune_summary.json'}", flush=True)
    return summary


def _print_trials(rows: List[Dict[str, Any]]) -> None:
    head = f"{'trial':<16} {'method':<10} {'epochs':>6} {'clean':>7} {'APGD':>7} {'PGD-CE':>7}  flags"
    print(head + "\n" + "-" * len(head), flush=True)
    fmt = lambda v: "   -   " if v is None else f"{v:7.4f}"  # noqa: E731
    for r in rows:
        print(f"{r['trial_id']:<16} {str(r['method']):<10} {r['epoch']:>6} {fmt(r['clean_acc'])} {fmt(r['robust_acc'])} "
              f"{fmt(r['pgd_ce_acc'])}  {', '.join(r['flags']) or '-'}", flush=True)
    print(f"APGD = APGD-CE + APGD-T (pyautoattack) on the validation subset; PGD-CE = PGD-{PGD_CE_STEPS} on "
          "cross-entropy, shown for contrast only.", flush=True)
