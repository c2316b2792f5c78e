"""The whole experiment: train every method in `cfg.methods` on Ray Train, evaluate each honestly,
print one table and write `<run_dir>/summary.json`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from .config import ExperimentConfig
from .io import provenance, sha256_file, write_json


def method_dir(cfg: ExperimentConfig, method: str) -> Path:
    return Path(cfg.run_dir) / method


def _cached_eval(path: Path, checkpoint: Path, cfg: ExperimentConfig) -> Dict[str, Any] | None:
    """A previous evaluation of the same checkpoint with the same eval settings, if any."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
        prov = old["provenance"]
        same_ckpt = prov["checkpoint_sha256"] == sha256_file(checkpoint)
        same_eval = prov["config"]["eval"] == cfg.to_dict()["eval"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return old if same_ckpt and same_eval else None


def summary_row(res: Dict[str, Any]) -> Dict[str, Any]:
    return {"method": res["method"], "clean_acc": res["clean_acc"], "pgd_acc": res["pgd_acc"],
            "autoattack_acc": res["autoattack_acc"], "flags": res["flags"]}


def format_table(rows: List[Dict[str, Any]], *, pgd_steps: int, n_eval: int, n_aa: int, eps: float) -> str:
    head = f"{'method':<12} {'clean':>7} {'PGD-' + str(pgd_steps):>8} {'AutoAttack':>11}  flags"
    lines = [head, "-" * len(head)]
    for r in rows:
        aa = "skipped" if r["autoattack_acc"] is None else f"{r['autoattack_acc']:.4f}"
        flags = ", ".join(r["flags"]) if r["flags"] else "-"
        lines.append(f"{r['method']:<12} {r['clean_acc']:>7.4f} {r['pgd_acc']:>8.4f} {aa:>11}  {flags}")
    lines.append(f"L-inf eps={eps}; clean and PGD-{pgd_steps} (weaker than AutoAttack) on n={n_eval} test images; "
                 f"AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) on the first n={n_aa}.")
    return "\n".join(lines)


def run_pipeline(cfg: ExperimentConfig) -> Dict[str, Any]:
    from .evaluation import evaluate_checkpoint
    from .train import fit

    rows = []
    for method in cfg.methods:
        print(f"== {method}: training ({cfg.train.epochs} epoch(s), {cfg.train.num_workers} Ray Train worker(s))", flush=True)
        trained = fit(cfg, method_dir(cfg, method), method=method)
        out = method_dir(cfg, method) / "eval.json"
        res = _cached_eval(out, trained.checkpoint, cfg)
        if res is None:
            print(f"== {method}: evaluating {trained.checkpoint.name}", flush=True)
            res = evaluate_checkpoint(cfg, trained.checkpoint, out, label=method)
        else:
            print(f"== {method}: reusing {out} (same checkpoint and eval settings)", flush=True)
        rows.append(summary_row(res))
    ec = cfg.eval
    summary = {
        "dataset": cfg.data.name, "eps": ec.eps, "norm": ec.norm, "n_eval": ec.n_eval, "n_autoattack": ec.n_autoattack,
        "attacks": {"pgd": f"PGD-{ec.pgd_steps}, {ec.pgd_restarts} restart(s) (weaker than AutoAttack)",
                    "autoattack": "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square (pyautoattack)"},
        "rows": rows,
        "provenance": provenance(config=cfg.to_dict(), seed=cfg.train.seed),
    }
    write_json(Path(cfg.run_dir) / "summary.json", summary)
    print(format_table(rows, pgd_steps=ec.pgd_steps, n_eval=ec.n_eval, n_aa=ec.n_autoattack, eps=ec.eps), flush=True)
    print(f"summary: {Path(cfg.run_dir) / 'summary.json'}", flush=True)
    return summary
