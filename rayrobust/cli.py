"""The `rayrobust` command line: `rayrobust <command> --config FILE --set key=value ...`.

A user error prints one line (`rayrobust: error: ...`) and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML experiment config (see configs/)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=2 --set eval.eps=0.2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrobust", description=(
        "Train adversarially robust image classifiers on Ray and evaluate them with AutoAttack."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _training_commands(sub)
    _semantic_commands(sub)
    _search_commands(sub)
    _data_commands(sub)
    return parser


def _training_commands(sub) -> None:
    """train, evaluate, certify, pipeline, results."""
    p = sub.add_parser("train", help="train one method on Ray Train (resumes the run in its run directory)",
                       description="Train cfg.train.method on Ray Train; writes <run_dir>/<method>/checkpoints/ and metrics.jsonl.")
    _common(p)
    p.add_argument("--method", help="shorthand for --set train.method=NAME")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint: clean, PGD and sharded AutoAttack with sanity flags",
                       description="Evaluate a checkpoint (default: the latest of cfg.train.method in the run directory).")
    _common(p)
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (default: latest in <run_dir>/<method>/checkpoints)")
    p.add_argument("--method", help="shorthand for --set train.method=NAME")
    p.add_argument("--out", metavar="PATH", help="where to write the JSON result (default: <run_dir>/<method>/eval.json)")

    p = sub.add_parser("certify", help="ClusTR l2 certificate: latent radii, Lipschitz bound, certified accuracy",
                       description="Certify a clustr/clustr_qtrades checkpoint on the first N test images (the "
                                   "certificate is reconstructed from the ClusTR paper, docs/methods.md section 2.5); an L2 "
                                   "PGD attack inside every certified radius checks it.")
    _common(p)
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint file (default: latest in <run_dir>/<method>/checkpoints)")
    p.add_argument("--method", help="shorthand for --set train.method=NAME")
    p.add_argument("--radii", default="0.1,0.25,0.5", metavar="R1,R2,...",
                   help="l2 radii in [0,1] pixel units for certified accuracy (default: 0.1,0.25,0.5)")
    p.add_argument("--n", type=int, metavar="N", help="test images to certify (default: eval.n_eval)")
    p.add_argument("--out", metavar="FILE", help="where to write the JSON result (default: certificate.json beside checkpoints/)")

    p = sub.add_parser("pipeline", help="train and evaluate every method of the config, print a table, write summary.json",
                       description="Run all stages for every method in cfg.methods and write <run_dir>/summary.json.")
    _common(p)

    p = sub.add_parser("results", help="the full comparison: the pipeline once per seed, aggregated; regenerates the README table",
                       description="Run the pipeline for every seed in cfg.seeds (<run_dir>/seed<N>/), write <run_dir>/summary.json "
                                   "with mean and std per method, and rewrite the README's results table.")
    _common(p)
    p.add_argument("--readme", metavar="PATH", default="README.md",
                   help="README whose results table is regenerated (default: README.md; 'none' to leave it)")


def _semantic_commands(sub) -> None:
    """extract, cluster, dictionaries: SRD's semantic stages one by one."""
    p = sub.add_parser("extract", help="latents of the training set under a checkpoint (Ray Data) -> Parquet",
                       description="Run forward_features over the training images in a Ray Data actor pool; writes "
                                   "<run_dir>/semantic/latents/*.parquet and a manifest.")
    _common(p)
    p.add_argument("--checkpoint", metavar="PATH", help="source checkpoint (default: latest of semantic.source_method)")

    p = sub.add_parser("cluster", help="adaptive per-class faiss k-means of the latents on Ray actors",
                       description="Choose K per class in [1, semantic.k_max] by silhouette; writes "
                                   "<run_dir>/semantic/clusters/ (clusters.json, centroids, means, variances).")
    _common(p)
    p.add_argument("--checkpoint", metavar="PATH", help="check the latents' dimension against this model")

    p = sub.add_parser("dictionaries", help="one sparse dictionary of high-frequency patches per cluster, on Ray actors",
                       description="Learn semantic reconstruction dictionaries; writes <run_dir>/semantic/dictionaries/.")
    _common(p)


def _search_commands(sub) -> None:
    """tune, report, dashboard."""
    p = sub.add_parser("tune", help="search the defenses' knobs with Optuna on Ray Tune, graded by APGD-CE + APGD-T",
                       description="Run the search of the config's tune: section in <run_dir> (Optuna study in "
                                   "<run_dir>/optuna.journal, Tune experiment in <run_dir>/tune/), then re-evaluate the "
                                   "Pareto front with full AutoAttack; or continue an interrupted search with --resume.")
    _common(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted search in RUN_DIR (keeps finished trials)")

    p = sub.add_parser("report", help="write a self-contained report.html (and summary.json) for a tune or pipeline run",
                       description="Write <run_dir>/report.html: AutoAttack table, Pareto front, robust vs eps, learning "
                                   "curves, parameter importances, flags.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of `rayrobust tune` or `rayrobust pipeline`")

    p = sub.add_parser("dashboard", help="serve optuna-dashboard over a search's Optuna study; print TensorBoard's command",
                       description="Serve optuna-dashboard over the Optuna study of the search in RUN_DIR (a local path, "
                                   "served live, or an s3://, gs:// URI, whose journal is downloaded first: a snapshot; a "
                                   "tune.optuna_storage database is served directly) and print the `tensorboard --logdir` "
                                   "command for its Ray Tune logs. Listens on 127.0.0.1: from another machine, tunnel with "
                                   "`ssh -N -L 8080:127.0.0.1:8080 user@host`. Needs pip install 'rayrobust[dashboard]'.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of `rayrobust tune`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")


def _data_commands(sub) -> None:
    """export-data, config, list."""
    p = sub.add_parser("export-data", help="write a dataset as Parquet image files (local path or s3://, gs:// URI) for streaming",
                       description="Write data.name's train and test splits (train limited to data.train_limit) to OUT as "
                                   "OUT/meta.json + OUT/<split>/*.parquet, streamed chunk by chunk by Ray workers "
                                   "(docs/data.md); train on it with --set data.name=parquet --set data.root=OUT.")
    _common(p)
    p.add_argument("--out", required=True, metavar="URI", help="destination directory: a local path or s3://, gs://, file:// URI")
    p.add_argument("--rows-per-file", type=int, default=10000, metavar="N", help="images per Parquet file (default: 10000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at OUT")

    p = sub.add_parser("config", help="print the resolved config as JSON", description="Validate and print the config.")
    _common(p)

    sub.add_parser("list", help="list registered datasets, models, methods and attacks",
                   description="List the names the registries accept.")


def _load(args) -> "ExperimentConfig":  # noqa: F821
    from .config import load_config

    overrides = list(args.overrides)
    if getattr(args, "method", None):
        overrides.append(f"train.method={args.method}")
    return load_config(args.config, overrides)


def _load_writable(args) -> "ExperimentConfig":  # noqa: F821
    """The config of a command that writes into the run directory, after a probe write proved it can:
    a wrong bucket, endpoint or credential stops the command here, before any work."""
    from .location import check_writable

    cfg = _load(args)
    check_writable(cfg.run_location())
    return cfg


def cmd_train(args) -> int:
    from .train import fit

    cfg = _load(args)
    result = fit(cfg)
    last = result.metrics[-1] if result.metrics else {}
    print(json.dumps({"checkpoint": result.checkpoint.uri, "epochs": result.epochs,
                      "last_epoch": {k: v for k, v in last.items() if isinstance(v, (int, float))}}, indent=2))
    return 0


def _checkpoint(args, cfg, hint: str) -> "Location":  # noqa: F821
    """--checkpoint (a local path or URI; a checkpoint directory or its checkpoint.pt), else the method's latest."""
    from .location import Location

    if args.checkpoint:
        return Location(args.checkpoint)
    return cfg.layout().latest_checkpoint(cfg.train.method, hint=hint)


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_checkpoint
    from .location import Location, check_writable

    cfg = _load(args)
    ckpt = _checkpoint(args, cfg, "run `rayrobust train` first or pass --checkpoint")
    out = Location(args.out) if args.out else cfg.layout().eval_file(cfg.train.method)
    check_writable(out.parent)
    res = evaluate_checkpoint(cfg, ckpt, out)
    keys = ("method", "norm", "eps", "n_eval", "clean_acc", "pgd_acc", "n_autoattack", "autoattack_version",
            "autoattack_acc", "flags")
    print(json.dumps({k: res[k] for k in keys}, indent=2))
    print(f"wrote {out}")
    return 0


def cmd_certify(args) -> int:
    from .certify import certify_checkpoint
    from .errors import ConfigError
    from .hardware import announce_hardware
    from .location import Location

    cfg = _load_writable(args)
    try:
        radii = [float(r) for r in args.radii.split(",") if r.strip()]
    except ValueError:
        radii = []
    if not radii:
        raise ConfigError(f"--radii {args.radii!r} must be comma-separated numbers >= 0, e.g. 0.1,0.25,0.5")
    ckpt = _checkpoint(args, cfg, "run `rayrobust train --method clustr` first or pass --checkpoint")
    out = Location(args.out) if args.out else cfg.layout().method_dir(cfg.train.method) / "certificate.json"
    announce_hardware()  # certify runs in this process, without Ray
    res = certify_checkpoint(ckpt, radii=radii, n=args.n if args.n is not None else cfg.eval.n_eval, out_path=out,
                             data_root=cfg.data.root, download=cfg.data.download, seed=cfg.eval.seed)
    keys = ("method", "n", "clean_acc", "certified_acc", "flags")
    print(json.dumps({**{k: res[k] for k in keys}, "lipschitz_bound": res["lipschitz"]["bound"],
                      "latent_radius_median": res["latent_radius"]["median"]}, indent=2))
    print(f"wrote {out}")
    return 0


def cmd_pipeline(args) -> int:
    from .pipeline import run_pipeline

    run_pipeline(_load(args))
    return 0


def cmd_results(args) -> int:
    from .results import run_results

    cfg = _load_writable(args)
    command = " ".join(["rayrobust results", *(["--config", args.config] if args.config else []),
                        *[f"--set {o}" for o in args.overrides]])
    readme = None if args.readme.lower() == "none" else Path(args.readme)
    run_results(cfg, command=command, readme=readme)
    return 0


def cmd_extract(args) -> int:
    from .semantic.stages import source_images, run_extract_stage

    cfg = _load_writable(args)
    manifest = run_extract_stage(cfg.semantic, cfg.run_location(), args.checkpoint, source_images(cfg.data, cfg.semantic))
    print(json.dumps({k: manifest[k] for k in ("n", "dim") if k in manifest}, indent=2))
    return 0


def cmd_cluster(args) -> int:
    from .semantic.stages import run_cluster_stage

    cfg = _load_writable(args)
    out = run_cluster_stage(cfg.semantic, cfg.run_location(), args.checkpoint)
    print(json.dumps({"k_per_class": out.get("k_per_class")}, indent=2))
    return 0


def cmd_dictionaries(args) -> int:
    from .semantic.stages import source_images, run_dictionaries_stage

    cfg = _load_writable(args)
    manifest = run_dictionaries_stage(cfg.semantic, cfg.run_location(), source_images(cfg.data, cfg.semantic))
    print(json.dumps({"num_clusters": manifest.get("num_clusters"), "params": manifest.get("params")}, indent=2))
    return 0


def cmd_export_data(args) -> int:
    from .data_ray import export_parquet
    from .raycluster import ensure_ray

    cfg = _load(args)
    ensure_ray(cfg.ray_address)
    meta = export_parquet(cfg.data, args.out, rows_per_file=args.rows_per_file, overwrite=args.overwrite, verbose=True)
    print(json.dumps({"out": args.out, "dataset": meta["name"], "shape": meta["shape"], "counts": meta["counts"]}, indent=2))
    return 0


def cmd_config(args) -> int:
    print(json.dumps(_load(args).to_dict(), indent=2))
    return 0


def cmd_tune(args) -> int:
    from .errors import ConfigError
    from .tune.search import resume_tune, run_tune

    if args.resume:
        if args.config or args.overrides:
            raise ConfigError("--resume continues a search with the config it was started with; drop --config/--set")
        resume_tune(args.resume)
    else:
        run_tune(_load(args))
    return 0


def cmd_report(args) -> int:
    from .tune.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def cmd_dashboard(args) -> int:
    from .dashboard import serve

    serve(args.run_dir, host=args.host, port=args.port)
    return 0


def cmd_list(args) -> int:
    from .attacks import ATTACKS
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    for title, reg in (("datasets", DATASETS), ("models", MODELS), ("methods", METHODS), ("attacks", ATTACKS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "certify": cmd_certify, "pipeline": cmd_pipeline, "results": cmd_results, "extract": cmd_extract,
            "cluster": cmd_cluster, "dictionaries": cmd_dictionaries, "config": cmd_config, "list": cmd_list, "export-data": cmd_export_data,
            "tune": cmd_tune, "report": cmd_report, "dashboard": cmd_dashboard}


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import RayRobustError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RayRobustError as e:
        print(f"rayrobust: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rayrobust: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
