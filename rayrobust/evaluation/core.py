"""Honest evaluation of any classifier: clean, PGD (labelled weaker) and AutoAttack accuracy, with flags.

`evaluate(model, dataset, eps=...)` takes any `torch.nn.Module` mapping [0,1] images to logits.
AutoAttack (standard version: APGD-CE, APGD-T, FAB-T, Square) runs sharded over Ray actors, or with
`backend="local"` in this process without Ray (the same chunks and seeds, so the same result).
The sanity checks of docs/evaluation.md §4 run next to every number; a failed one becomes a flag.
Before AutoAttack, two forward passes decide whether the model is random (then AutoAttack's "rand" version,
with EOT, attacks it) and whether its outputs are probabilities (then it is also attacked on their log, and
the lower robust accuracy is reported); `autoattack.attack` names what produced the number.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..attacks import ATTACKS, accuracy, robust_accuracy
from ..attacks.autoattack import LogOutputs, attack_label, attacks_for, summarize_autoattack
from ..attacks.checks import (check_before_autoattack, check_robust_le_clean, check_square_vs_whitebox, failed,
                              run_model_checks)
from ..errors import ConfigError
from ..io import provenance, write_json
from ..location import Where, as_location
from ..progress import AttackBar
from .resume import ChunkStore

DatasetLike = Union[str, Tuple[torch.Tensor, torch.Tensor], Any]
BACKENDS = ("ray", "local")  # where AutoAttack runs: sharded over Ray actors, or in this process


def _as_tensors(dataset: DatasetLike, n: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
    if isinstance(dataset, str):
        from ..data import load_dataset

        ds = load_dataset(dataset, "test", limit=n)
        return ds.x, ds.y, ds.name
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        x, y = dataset
        return torch.as_tensor(x)[:n], torch.as_tensor(y)[:n], "tensors"
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        return dataset.x[:n], dataset.y[:n], getattr(dataset, "name", "dataset")
    raise ConfigError("dataset must be a dataset name, an (x, y) pair of tensors, or a rayrobust ArrayDataset")


def _validate_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ConfigError(f"images must be a (N,C,H,W) tensor, got shape {tuple(x.shape)}")
    if x.min() < 0 or x.max() > 1:
        raise ConfigError("images must be in [0,1]; put any normalisation inside the model")
    if len(x) != len(y):
        raise ConfigError(f"{len(x)} images but {len(y)} labels")


def _pgd_accuracy(model: nn.Module, x, y, *, eps, norm, steps, restarts, seed, batch_size) -> Tuple[float, float]:
    attack = ATTACKS.create("pgd", model=model, eps=eps, norm=norm, steps=steps, restarts=restarts, seed=seed)
    return accuracy(model, x, y, batch_size), robust_accuracy(model, attack, x, y, batch_size)


def _on_accelerator(fn, *args, backend: str = "ray", **kwargs):
    """Run `fn` here when this process has a GPU, the cluster has none or `backend` is "local"; otherwise as a
    Ray task on one of the cluster's GPUs (a CPU-only head node drives a GPU cluster)."""
    if torch.cuda.is_available() or backend == "local":
        return fn(*args, **kwargs)
    try:
        import ray
    except ImportError:  # without Ray there is no cluster to send it to
        return fn(*args, **kwargs)

    if not ray.is_initialized() or ray.cluster_resources().get("GPU", 0) < 1:
        return fn(*args, **kwargs)

    def on_gpu(*a, **kw):
        moved = [v.cuda() if isinstance(v, (torch.Tensor, nn.Module)) else v for v in a]
        return fn(*moved, **kw)

    return ray.get(ray.remote(num_gpus=1)(on_gpu).remote(*args, **kwargs))


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("backend='ray' needs Ray installed (pip install 'ray[default]'); backend='local' runs "
                          "AutoAttack in this process without it") from None


def _printer(enabled: bool, label: str):
    def progress(done: int, total: int) -> None:
        if enabled:
            print(f"  [{label}] AutoAttack chunk {done}/{total}", file=sys.stderr, flush=True)

    return progress


def _checked_inputs(dataset: DatasetLike, *, n: int, n_autoattack: int, eps: float, norm: str, version: str,
                    backend: str) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(x, y, dataset name) after every argument check: a bad argument is a ConfigError before any attack."""
    from ..config import AUTOATTACK_VERSIONS, check_budget

    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is unknown; use one of {', '.join(repr(b) for b in BACKENDS)}")
    check_budget("eps", eps, norm)
    if version not in AUTOATTACK_VERSIONS:
        raise ConfigError(f"version={version!r} is unknown; use one of: {', '.join(AUTOATTACK_VERSIONS)} "
                          "(rand: EOT, for randomized models)")
    if not 0 <= n_autoattack <= n:
        raise ConfigError(f"n_autoattack={n_autoattack} must be between 0 and n={n}")
    x, y, ds_name = _as_tensors(dataset, n)
    _validate_inputs(x, y)
    check_budget("eps", eps, norm, tuple(x.shape[1:]))  # an L2 budget no longer than the images' diameter
    return x, y, ds_name


def _connect(*, n_autoattack: int, backend: str, ray_address: Optional[str], verbose: bool) -> None:
    """Join (or start) Ray when AutoAttack will be sharded; print the hardware line once per process."""
    if n_autoattack and backend == "ray":
        _require_ray()
        from ..raycluster import ensure_ray

        ensure_ray(ray_address)
    if verbose:  # "hardware: ..." once per process: the Ray cluster's totals when AutoAttack runs on it
        from ..hardware import announce_hardware
        from ..raycluster import announce_cluster_or_local

        announce_cluster_or_local(ray_address) if n_autoattack and backend == "ray" else announce_hardware()


def _attack_target(attacked: nn.Module, target: str, xa: torch.Tensor, ya: torch.Tensor, *, version: str, eps: float,
                   norm: str, seed: int, chunk_size: int, num_shards: int, backend: str, label: str, verbose: bool,
                   resume_dir, resume_identity: str) -> Dict[str, Any]:
    """AutoAttack `version` on one target (the outputs, or their log), locally or sharded, resumable."""
    from .sharded import local_autoattack, sharded_autoattack

    # interactive: a bar (img/s, ETA, robust points left per attack stage); logs: a line per chunk
    bar = AttackBar(len(xa), attacks_for(version), f"  [{label}] " + attack_label(version)
                    + ("" if target == "outputs" else f" on {target}"), enabled=None if verbose else False)
    shown = {"progress": None if bar.enabled else _printer(verbose, label),
             "on_chunk": bar.chunk if bar.enabled else None}
    shown["store"] = ChunkStore.maybe_open(
        resume_dir, "autoattack" if target == "outputs" else "autoattack-log", attacked, xa, ya,
        {"eps": eps, "norm": norm, "version": version, "seed": seed, "chunk_size": chunk_size,
         "target": target, "identity": resume_identity})
    with bar:
        if backend == "local":
            return local_autoattack(attacked, xa, ya, eps=eps, norm=norm, version=version, seed=seed,
                                    chunk_size=chunk_size, on_stage=bar.stage if bar.enabled else None, **shown)
        return sharded_autoattack(attacked, xa, ya, eps=eps, norm=norm, version=version, seed=seed,
                                  chunk_size=chunk_size, num_shards=num_shards, **shown)


def _autoattack_part(model: nn.Module, xa: torch.Tensor, ya: torch.Tensor, result: Dict[str, Any], *, version: str,
                     probe: torch.Tensor, **settings) -> list:
    """AutoAttack on (xa, ya) after the two checks that decide how it runs; fills result["autoattack*"] and
    returns (the flags it raised, the target the reported number came from, its per-image outcomes)."""
    before = check_before_autoattack(model, probe)
    randomized, probabilities = (not f.passed for f in before)
    aa_version = "rand" if randomized else version  # a random model is attacked with EOT
    targets = [("outputs", model)] + ([("log(outputs)", LogOutputs(model))] if probabilities else [])
    runs = []
    device = probe.device
    for target, attacked in targets:
        aa = _attack_target(attacked, target, xa, ya, version=aa_version, **settings)
        model.to(device)
        runs.append((target, aa, summarize_autoattack(aa["broken_by"], attacks_for(aa_version))))
    target, aa, summary = min(runs, key=lambda run: run[2]["robust"])  # the lower number; ties: the outputs
    attack = attack_label(aa_version) + ("" if target == "outputs" else f" on {target}")
    result["autoattack_acc"] = summary["robust"]
    result["autoattack_version"] = aa_version  # "rand" for a random model, whatever was requested
    result["autoattack"] = {"attack": attack, "version": aa_version, "target": target, "per_attack": summary,
                            "seed": settings["seed"], "n": len(xa), "backend": settings["backend"],
                            "num_shards": aa["num_shards"], "chunk_size": settings["chunk_size"],
                            "seconds": sum(run[1]["seconds"] for run in runs), "workers": aa["workers"],
                            "nodes": aa["nodes"]}
    if "chunks" in aa:
        result["autoattack"]["chunks"] = aa["chunks"]
    if aa_version != version:
        result["autoattack"]["version_requested"] = version
    if len(runs) > 1:  # probabilities: attacked on the outputs and on their log, the lower one reported
        result["autoattack"]["by_target"] = {t: {"robust": s["robust"], "per_attack": s} for t, _, s in runs}
    if settings["verbose"]:
        print(f"  [{settings['label']}] {attack} {summary['robust']:.4f} on n={len(xa)} "
              f"({result['autoattack']['seconds']:.1f}s)", file=sys.stderr, flush=True)
    # AutoAttack's own tolerance (0.002), but never below one example: one point Square breaks
    # out of a few hundred is noise, two or more is a signal.
    flags = before + [check_robust_le_clean(summary["clean"], {"autoattack": summary["robust"]}),
                     check_square_vs_whitebox(summary, tol=max(0.002, 1.0 / len(xa)))]
    return flags, dict(targets)[target], aa["broken_by"]


def evaluate(
    model: nn.Module, dataset: DatasetLike, *, eps: float = 0.1, norm: str = "Linf", n: int = 1000,
    n_autoattack: int = 200, pgd_steps: int = 20, pgd_restarts: int = 1, seed: int = 0, num_shards: int = 2,
    batch_size: int = 250, chunk_size: int = 100, checks: bool = True, version: str = "standard",
    label: str = "model", ray_address: Optional[str] = None, verbose: bool = True, backend: str = "ray",
    resume_dir: Optional["Where"] = None, resume_identity: str = "", device: Optional[Union[str, torch.device]] = None,
    eps_curve: bool = False, eps_curve_n: int = 0, gallery: int = 0, class_names: Tuple[str, ...] = (),
) -> Dict[str, Any]:
    """Evaluate `model` (logits from [0,1] images) on the first `n` test images.

    `backend="ray"` shards AutoAttack over `num_shards` Ray actors (connecting to `ray_address`, RAY_ADDRESS
    or a new local cluster); `backend="local"` runs it in this process without Ray, chunk by chunk with the
    same chunks and seeds, so both give the same per-image result (on the same device and torch threads).

    Before AutoAttack, two forward passes on its first batch decide whether the model is random: a random model
    is flagged `nondeterministic` and attacked with AutoAttack's "rand" version (APGD-CE and APGD-DLR with EOT,
    each decision a majority vote over several passes). Outputs that are probabilities are flagged
    `softmax_output` and attacked both as they are and on their logarithm; the lower robust accuracy is reported.
    `result["autoattack"]["attack"]` names what produced the number, e.g. "AutoAttack (rand, EOT=20)".

    `resume_dir` (a local path or URI): finished AutoAttack chunks are saved there, keyed by the weights, the
    images, the settings and `resume_identity`; a rerun attacks only the others (`result["autoattack"]["chunks"]`).

    `norm` "Linf" budgets are in (0, 1]; "L2" budgets may exceed 1, up to the images' diameter sqrt(C*H*W).
    `version`: AutoAttack's "standard", "plus" or "rand" (EOT); `result["autoattack_version"]` records it.
    `device` (None: the GPU when there is one, else the CPU) is where the model, clean and PGD accuracy go.

    `eps_curve`: add result["eps_curve"], APGD-CE + APGD-T at eps/2, eps, 3eps/2, 2eps on AutoAttack's images
    (the first `eps_curve_n` of them, in whole chunks, when > 0);
    `gallery` > 0: add result["gallery"], that many of AutoAttack's adversarial examples with their predictions
    (`class_names` names the labels). Both are what `rayrobust report` draws (see rayrobust.evaluation.figures).

    Example:
        >>> res = rayrobust.evaluate(my_model, "fashion_mnist", eps=0.1, n=500, n_autoattack=100)
        >>> res["autoattack_acc"], res["flags"]
        >>> res = rayrobust.evaluate(my_model, (x, y), eps=0.1, n=500, n_autoattack=100, backend="local")
    """
    x, y, ds_name = _checked_inputs(dataset, n=n, n_autoattack=n_autoattack, eps=eps, norm=norm, version=version,
                                    backend=backend)
    _connect(n_autoattack=n_autoattack, backend=backend, ray_address=ray_address, verbose=verbose)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    t0 = time.perf_counter()
    result = _clean_and_pgd(model, x, y, eps=eps, norm=norm, pgd_steps=pgd_steps, pgd_restarts=pgd_restarts, seed=seed,
                            batch_size=batch_size, backend=backend, label=label, verbose=verbose, ds_name=ds_name)
    result.update({"n_autoattack": n_autoattack, "autoattack_acc": None, "autoattack": None, "autoattack_version": version})
    flags = [check_robust_le_clean(result["clean_acc"], {"pgd": result["pgd_acc"]})]
    if n_autoattack:
        settings = {"eps": eps, "norm": norm, "seed": seed, "chunk_size": chunk_size, "num_shards": num_shards,
                    "backend": backend, "label": label, "verbose": verbose, "resume_dir": resume_dir,
                    "resume_identity": resume_identity}
        xa, ya = x[:n_autoattack].cpu(), y[:n_autoattack].cpu()
        aa_flags, attacked, broken_by = _autoattack_part(model, xa, ya, result, version=version,
                                                         probe=x[:min(n_autoattack, batch_size)], **settings)
        flags += aa_flags
        model.to(device)
        _add_figures(result, attacked, broken_by, xa, ya, eps_curve=eps_curve,
                     eps_curve_n=eps_curve_n, gallery=gallery,
                     class_names=class_names, **{k: settings[k] for k in ("eps", "norm", "seed", "chunk_size", "backend",
                                                                          "label", "verbose")})
        model.to(device)
    if checks:
        flags += _model_checks(model, x, y, result, n_checks=min(len(x), max(n_autoattack, 200)), eps=eps, norm=norm,
                               seed=seed, batch_size=batch_size, backend=backend, label=label, verbose=verbose)
    result["checks"] = [{"name": f.name, "passed": f.passed, "detail": f.detail} for f in flags]
    result["flags"] = list(dict.fromkeys(failed(flags))) + ([] if n_autoattack else ["autoattack_skipped"])
    result["seconds"] = time.perf_counter() - t0
    return result


def _clean_and_pgd(model, x, y, *, eps, norm, pgd_steps, pgd_restarts, seed, batch_size, backend, label, verbose,
                   ds_name) -> Dict[str, Any]:
    """The result's head: clean and PGD accuracy on all `n` images (on the accelerator when there is one)."""
    t0 = time.perf_counter()
    clean_acc, pgd_acc = _on_accelerator(_pgd_accuracy, model, x, y, eps=eps, norm=norm, steps=pgd_steps,
                                         restarts=pgd_restarts, seed=seed, batch_size=batch_size, backend=backend)
    if verbose:
        print(f"  [{label}] clean {clean_acc:.4f}  PGD-{pgd_steps} {pgd_acc:.4f}  (n={len(x)}, {time.perf_counter() - t0:.1f}s)",
              file=sys.stderr, flush=True)
    return {
        "label": label, "dataset": ds_name, "eps": eps, "norm": norm, "n_eval": len(x),
        "clean_acc": clean_acc, "pgd_acc": pgd_acc,
        "pgd": {"attack": f"PGD-{pgd_steps} on cross-entropy, {pgd_restarts} restart(s), random start",
                "steps": pgd_steps, "restarts": pgd_restarts, "strength": "weaker than AutoAttack"},
    }


def _model_checks(model, x, y, result, *, n_checks, eps, norm, seed, batch_size, backend, label, verbose) -> list:
    """The model's sanity checks on the first `n_checks` images; their measurements go into `result`."""
    t_checks = time.perf_counter()
    model_flags, measurements = _on_accelerator(run_model_checks, model, x[:n_checks], y[:n_checks], eps=eps,
                                                norm=norm, seed=seed, batch_size=batch_size, backend=backend)
    result["measurements"] = measurements
    if verbose:
        print(f"  [{label}] sanity checks on n={n_checks} ({time.perf_counter() - t_checks:.1f}s)", file=sys.stderr, flush=True)
    return model_flags


def _add_figures(result, attacked, broken_by, xa, ya, *, eps, norm, seed, chunk_size, eps_curve, eps_curve_n, gallery, class_names,
                 backend, label, verbose) -> None:
    """result["eps_curve"] and result["gallery"] (the report's robust-vs-eps curve and adversarial examples), on the
    target AutoAttack's reported number came from."""
    from . import figures

    version = result["autoattack"]["version"]
    if eps_curve:
        n_c = figures.curve_images(len(xa), chunk_size, eps_curve_n)
        aligned = n_c == len(xa) or n_c % chunk_size == 0  # the same chunks as AutoAttack: its stages are the curve's
        at_eps = figures.robust_after(broken_by[:n_c], version) if aligned else None
        result["eps_curve"] = _on_accelerator(figures.eps_curve, attacked, xa[:n_c], ya[:n_c], eps=eps, norm=norm,
                                              version=version, seed=seed, chunk_size=chunk_size, at_eps=at_eps,
                                              backend=backend)
        if verbose:
            pts = ", ".join(f"{p['eps']:g}: {p['robust']:.3f}" for p in result["eps_curve"]["points"])
            print(f"  [{label}] robust vs eps ({result['eps_curve']['attack'].split(' (')[0]}): {pts} "
                  f"({result['eps_curve']['seconds']:.1f}s)", file=sys.stderr, flush=True)
    if gallery:
        result["gallery"] = _on_accelerator(figures.gallery, attacked, xa, ya, broken_by, eps=eps, norm=norm,
                                            version=version, seed=seed, k=gallery, class_names=tuple(class_names),
                                            backend=backend)


def evaluate_checkpoint(cfg, checkpoint: "Where", out_path: Optional["Where"] = None,
                        *, label: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate a rayrobust checkpoint (a local path or URI) with `cfg.eval` through its method's decision
    function; write the result to `out_path` (a local path or URI) when given."""
    from ..checkpoint import checkpoint_sha256, load_trained
    from ..data import load_dataset

    checkpoint = as_location(checkpoint)
    model, method, decision, payload = load_trained(checkpoint)
    method_name = payload["config"]["train"]["method"]
    ec = cfg.eval
    data_name = payload["config"]["data"]["name"]
    ds = load_dataset(data_name, "test", root=cfg.data.root, download=cfg.data.download, limit=ec.n_eval)
    sha = checkpoint_sha256(checkpoint)
    # Finished attack chunks are saved beside the result as they finish: an interrupted evaluation resumes.
    resume = {"resume_dir": as_location(out_path).parent if out_path is not None else None, "resume_identity": sha}
    res = evaluate(decision, ds, eps=ec.eps, norm=ec.norm, n=ec.n_eval, n_autoattack=ec.n_autoattack,
                   version=ec.autoattack_version,
                   pgd_steps=ec.pgd_steps, pgd_restarts=ec.pgd_restarts, seed=ec.seed, num_shards=ec.num_shards,
                   batch_size=ec.batch_size, chunk_size=ec.chunk_size, checks=ec.checks, label=label or method_name,
                   ray_address=cfg.ray_address, eps_curve=ec.eps_curve, eps_curve_n=ec.eps_curve_n, gallery=ec.gallery,
                   class_names=tuple(getattr(ds, "classes", ()) or ()), **resume)
    if method.purifies:  # purify -> classify (srd): add BPDA + EOT and the non-adaptive number
        from .adaptive import evaluate_purified

        evaluate_purified(decision, ds.x[:ec.n_eval], ds.y[:ec.n_eval], res, eps=ec.eps, norm=ec.norm, seed=ec.seed,
                          eot_samples=ec.eot_samples, chunk_size=ec.chunk_size, num_shards=ec.num_shards,
                          label=label or method_name, **resume)
    if method.certifiable:  # ClusTR: its l2 certificate (reconstructed), checked by an attack
        from ..certify import certify

        # its attack check on as many certified examples as AutoAttack gets (100 when AutoAttack is skipped)
        res["certificate"] = certify(model, method, ds.x[:ec.n_eval], ds.y[:ec.n_eval], seed=ec.seed,
                                     check_n=ec.n_autoattack or 100)
        res["flags"] = res["flags"] + res["certificate"]["flags"]
    res["method"] = method_name
    res["provenance"] = provenance(config=cfg.to_dict(), seed=ec.seed, checkpoint=checkpoint.uri,
                                   checkpoint_sha256=sha, trained_with=payload["config"])
    if out_path is not None:
        write_json(out_path, res)
    return res
