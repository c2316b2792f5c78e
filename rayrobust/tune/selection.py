"""The end of a search: its trials' rows, the Pareto front and the selection (never a flagged trial), the
final AutoAttack of the selected configurations, and `tune_summary.json` / `summary.json`."""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Dict, List, Optional

from ..config import ExperimentConfig, config_from_dict
from ..io import provenance, read_json, write_json
from ..layout import CHECKPOINTS
from ..location import Location, as_location
from .grading import GRADING, PGD_CE_STEPS
from .study import ASHA_METRIC, EXPERIMENT, OBJECTIVES, StudyStorage

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


def _trial_rows(run: Location, grid) -> List[Dict[str, Any]]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or PurePosixPath(str(result.path)).name
        try:
            params = read_json(run / "trials" / trial_id / "params.json")["params"]
        except (FileNotFoundError, ValueError, KeyError):
            params = dict(result.config or {})
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


def _close_orphans(study_store: StudyStorage) -> int:
    """Optuna trials left RUNNING by a killed driver (never told): mark them FAIL, labelled."""
    import optuna

    storage = study_store.storage()
    study = optuna.load_study(study_name=study_store.study_name, storage=storage)
    n = 0
    for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        storage.set_trial_user_attr(t._trial_id, "orphaned", "asked by a search driver that was killed; its Tune trial was not kept")
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        n += 1
    return n


def _final_eval(tcfg: ExperimentConfig, ckpt: Location, out: Location, label: str) -> Dict[str, Any]:
    """Full AutoAttack of a selected trial; an earlier evaluation of the same checkpoint with the same
    eval settings (a resumed or re-summarised search) is reused."""
    from ..checkpoint import checkpoint_sha256
    from ..evaluation import evaluate_checkpoint

    try:
        old = read_json(out)
        prov = old.get("provenance") or {}
        if (prov.get("checkpoint_sha256") == checkpoint_sha256(ckpt)
                and (prov.get("config") or {}).get("eval") == tcfg.to_dict()["eval"]):
            print(f"   reusing {out.uri} (same checkpoint, same eval settings)", flush=True)
            return old
    except (FileNotFoundError, ValueError, AttributeError):
        pass
    return evaluate_checkpoint(tcfg, ckpt, out, label=label)


def finish(cfg: ExperimentConfig, run: Location, grid, study_store: Optional[StudyStorage] = None) -> Dict[str, Any]:
    """Select the Pareto front, re-evaluate it with full AutoAttack, write tune_summary.json and summary.json."""
    from ..checkpoint import latest_valid_checkpoint
    from ..tables import format_table, summary_row

    run = as_location(run)
    study_store = study_store or StudyStorage(run, cfg.tune.optuna_storage)
    rows = _trial_rows(run, grid)
    orphans = _close_orphans(study_store)
    study_store.push()
    chosen = select(rows, cfg.tune.final_top_k)
    final = []
    for r in chosen:
        tdir = run / "trials" / r["trial_id"]
        ckpt = latest_valid_checkpoint(tdir / CHECKPOINTS)
        if ckpt is None:
            print(f"warning: trial {r['trial_id']} has no valid checkpoint in {(tdir / CHECKPOINTS).uri}; "
                  "not re-evaluated", flush=True)
            continue
        tcfg = config_from_dict(read_json(tdir / "params.json")["config"])
        print(f"== final AutoAttack: trial {r['trial_id']} ({r['method']}, {r['params']})", flush=True)
        res = _final_eval(tcfg, ckpt, tdir / "final_eval.json", r["trial_id"])
        final.append({"trial_id": r["trial_id"], "params": r["params"], **summary_row(res),
                      "autoattack_per_attack": (res.get("autoattack") or {}).get("per_attack"),
                      "eval": (tdir / "final_eval.json").uri})
    from ..labels import autoattack_label

    ec = cfg.eval
    attacks = {"grading": GRADING, "pgd_ce": f"PGD-{PGD_CE_STEPS} on cross-entropy (contrast only, never the objective)",
               "pgd": f"{ec.norm} PGD-{ec.pgd_steps}, {ec.pgd_restarts} restart(s) (weaker than AutoAttack)",
               "autoattack": f"{autoattack_label(ec.autoattack_version)}, {ec.norm} (pyautoattack)"}
    summary = {
        "kind": "tune", "dataset": cfg.data.name, "eps": ec.eps, "norm": ec.norm, "n_eval": ec.n_eval,
        "n_autoattack": ec.n_autoattack, "pgd_steps": ec.pgd_steps, "val_n": cfg.tune.val_n, "num_samples": cfg.tune.num_samples,
        "space": cfg.tune.space, "objectives": OBJECTIVES, "asha_metric": ASHA_METRIC if cfg.tune.asha else None,
        "storage": study_store.describe(), "study_name": study_store.study_name,
        "experiment_dir": (run / EXPERIMENT).uri,
        "attacks": attacks, "trials": rows, "pareto": [r["trial_id"] for r in pareto_front(
            [r for r in rows if not r["flagged"] and r["clean_acc"] is not None])],
        "selected": [r["trial_id"] for r in chosen], "final": final, "orphaned_optuna_trials": orphans,
        "provenance": provenance(config=cfg.to_dict(), seed=cfg.tune.seed),
    }
    write_json(run / "tune_summary.json", summary)
    write_json(run / "summary.json", {
        "kind": "tune", "dataset": cfg.data.name, "eps": ec.eps, "norm": ec.norm, "n_eval": ec.n_eval,
        "n_autoattack": ec.n_autoattack, "attacks": attacks,
        "rows": [{k: f[k] for k in ("trial_id", "method", "clean_acc", "pgd_acc", "autoattack_acc", "flags")} for f in final],
        "tune_summary": (run / "tune_summary.json").uri, "provenance": summary["provenance"]})
    _print_trials(rows)
    if final:
        print(format_table(final, pgd_steps=ec.pgd_steps, n_eval=ec.n_eval, n_aa=ec.n_autoattack, eps=ec.eps), flush=True)
    else:
        print("no unflagged trial finished: nothing re-evaluated", flush=True)
    print(f"summary: {(run / 'tune_summary.json').uri}", flush=True)
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
