"""The whole experiment: train every method in `cfg.methods` on Ray Train, evaluate each honestly,
print one table and write `<run_dir>/summary.json`."""
from __future__ import annotations

from typing import Any, Dict

from .config import ExperimentConfig
from .io import provenance, read_json, write_json
from .labels import autoattack_label
from .location import Location
from .tables import format_table, summary_row


def method_dir(cfg: ExperimentConfig, method: str) -> Location:
    return cfg.layout().method_dir(method)


def _cached_eval(path: Location, checkpoint: Location, cfg: ExperimentConfig) -> Dict[str, Any] | None:
    """A previous evaluation of the same checkpoint with the same eval settings, if any."""
    from .checkpoint import checkpoint_sha256

    try:
        old = read_json(path)
        prov = old["provenance"]
        same_ckpt = prov["checkpoint_sha256"] == checkpoint_sha256(checkpoint)
        same_eval = prov["config"]["eval"] == cfg.to_dict()["eval"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return old if same_ckpt and same_eval else None


def run_pipeline(cfg: ExperimentConfig) -> Dict[str, Any]:
    """Run `cfg.stages`: train the methods that need no semantic artifacts, run the semantic latent
    stages, train the methods built on them (srd), then evaluate every method."""
    from .evaluation import evaluate_checkpoint
    from .train import fit

    from .location import check_writable

    run = cfg.layout()
    check_writable(run.root)  # a wrong bucket, endpoint or credential fails here, before any work
    rows = []
    trained = {}
    # Order: methods that need no semantic artifacts (and semantic.source_method) -> extract, cluster,
    # dictionaries -> methods trained from those artifacts (srd) -> evaluate.
    early, late = _training_order(cfg)
    from .raycluster import announce_cluster_or_local

    announce_cluster_or_local(cfg.ray_address)  # "hardware: ..." (once per process)
    if "train" in cfg.stages:
        for method in early:
            tc = cfg.for_method(method).train
            print(f"== {method}: training ({tc.epochs} epoch(s), {tc.num_workers} Ray Train worker(s))", flush=True)
            trained[method] = fit(cfg, method_dir(cfg, method), method=method).checkpoint
    semantic = _run_semantic(cfg) if any(s in cfg.stages for s in ("extract", "cluster", "dictionaries")) else None
    if "train" in cfg.stages:
        for method in late:
            print(f"== {method}: training from the semantic artifacts ({cfg.for_method(method).train.epochs} epoch(s))",
                  flush=True)
            trained[method] = fit(cfg, method_dir(cfg, method), method=method).checkpoint
    if "evaluate" in cfg.stages:
        for method in cfg.methods:
            ckpt = trained.get(method) or _latest(cfg, method)
            out = run.eval_file(method)
            mcfg = cfg.for_method(method)
            res = _cached_eval(out, ckpt, mcfg)
            if res is None:
                print(f"== {method}: evaluating {ckpt.name if ckpt.name != 'checkpoint.pt' else ckpt.parent.name}",
                      flush=True)
                res = evaluate_checkpoint(mcfg, ckpt, out, label=method)
            else:
                print(f"== {method}: reusing {out} (same checkpoint and eval settings)", flush=True)
            rows.append(summary_row(res))
    ec = cfg.eval
    summary = {
        "dataset": cfg.data.name, "eps": ec.eps, "norm": ec.norm, "n_eval": ec.n_eval, "n_autoattack": ec.n_autoattack,
        "autoattack_version": ec.autoattack_version,
        "attacks": {"pgd": f"{ec.norm} PGD-{ec.pgd_steps}, {ec.pgd_restarts} restart(s) (weaker than AutoAttack)",
                    "autoattack": f"{autoattack_label(ec.autoattack_version)}, {ec.norm} (pyautoattack)"},
        "rows": rows,
        "provenance": provenance(config=cfg.to_dict(), seed=cfg.train.seed),
    }
    if any("adaptive_acc" in r for r in rows):  # purification defenses (srd): name the attacks of the extra columns
        from .evaluation.adaptive import ADAPTIVE_COLUMN, NONADAPTIVE_COLUMN

        summary["attacks"].update(adaptive=ADAPTIVE_COLUMN, nonadaptive=NONADAPTIVE_COLUMN)
    if semantic is not None:
        summary["semantic"] = semantic
    write_json(run.summary, summary)
    if rows:
        print(format_table(rows, pgd_steps=ec.pgd_steps, n_eval=ec.n_eval, n_aa=ec.n_autoattack, eps=ec.eps,
                           norm=ec.norm, version=ec.autoattack_version), flush=True)
    print(f"summary: {run.summary}", flush=True)
    return summary


def _needs_semantic(method: str) -> bool:
    from .methods import METHODS

    return METHODS.get(method).needs_semantic


def _training_order(cfg: ExperimentConfig) -> tuple:
    """(methods trained before the semantic stages, methods trained after them).

    semantic.source_method is trained first whenever the semantic stages or a method that needs them
    run, even when it is not in `methods` (it is then trained but not evaluated).
    """
    from .errors import ConfigError

    late = [m for m in cfg.methods if _needs_semantic(m)]
    early = [m for m in cfg.methods if m not in late]
    source = cfg.semantic.source_method
    if late or any(s in cfg.stages for s in ("extract", "cluster", "dictionaries")):
        if _needs_semantic(source):
            raise ConfigError(f"semantic.source_method={source!r} is trained from the semantic artifacts itself; "
                              "use a plain classifier such as standard or pgd_at")
        if source not in early:
            early.insert(0, source)
    return early, late


def _latest(cfg: ExperimentConfig, method: str) -> Location:
    return cfg.layout().latest_checkpoint(method, hint="add 'train' to stages or run `rayrobust train` first")


def _run_semantic(cfg: ExperimentConfig) -> Dict[str, Any]:
    """The latent stages named in cfg.stages, from semantic.source_method's latest checkpoint."""
    from .semantic.stages import (source_images, run_cluster_stage, run_dictionaries_stage,
                                  run_extract_stage)

    sc = cfg.semantic
    ckpt = _latest(cfg, sc.source_method)
    out: Dict[str, Any] = {"source_checkpoint": ckpt.uri}
    dataset = source_images(cfg.data, sc)
    if "extract" in cfg.stages:
        out["latents"] = {k: v for k, v in run_extract_stage(sc, cfg.run_location(), ckpt, dataset).items() if k in ("n", "dim")}
    if "cluster" in cfg.stages:
        out["k_per_class"] = run_cluster_stage(sc, cfg.run_location(), ckpt).get("k_per_class")
    if "dictionaries" in cfg.stages:
        out["dictionaries"] = run_dictionaries_stage(sc, cfg.run_location(), dataset).get("num_clusters")
    return out
