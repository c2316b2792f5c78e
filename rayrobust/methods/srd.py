"""SRD — latent-constrained adversarial training + purification (docs/methods.md §1.5–1.7; after Silva et al.).

Training (§1.5). With g_f the latent (`forward_features`) and g the logits of the model being trained,
μ_k, σ²_k the diagonal Gaussian of cluster k (from the `cluster` stage) and d the latent dimension:

    k*(x, y) = argmin_{k : class(k) = y} Σ_j (g_f(x)_j − μ_kj)² / σ²_kj        (clean latent, current g)
    L        = CE(g(x_adv), y) + λ · (1/d) ‖(g_f(x_adv) − μ_k*) / σ_k*‖²        (mean over the batch)

x_adv comes from PGD on the same L (random start, `attack_steps` steps of 2.5·eps/k). λ = `train.method_args.srd.latent_weight`.
Our choices: the constraint is divided by d (a mean over latent dimensions, so λ does not scale with
the latent width); k* is recomputed from the current g on every batch (the clusters stay fixed) with
the clusters' own variances, as the purifier picks its cluster; in the constraint, σ²_k is floored at
`REL_VAR_FLOOR` × the cluster's mean variance. Without that floor, latent units that are dead for a
cluster (variance at the cluster stage's floor, 1e-4: a quarter of all units of a small_cnn on digits)
dominate the term — measured 50 per dimension on PGD examples vs 0.7 on clean ones — and their
1/σ² gradients diverged training within 5 steps at λ=0.1; with the floor, the same run trains.

Initial weights (our choice): g starts from the source checkpoint the semantic artifacts were made
from (`semantic.source_method`), so the cluster distributions describe g's own latent space at the
start; g must therefore have the source model's architecture (checked before training starts).

Inference (§1.6): `decision(model)` = `PurifiedClassifier(Purifier(g, ...), g)`: nearest cluster of
g_f(x) over all classes → sparse re-coding of the high-frequency patches on that cluster's dictionary
→ classify with g. This is the deployed function and the one the evaluation attacks end to end
(`rayrobust.evaluation.adaptive` adds BPDA and the labelled non-adaptive number, §1.7).

Everything the purifier needs — cluster means, variances and classes, the dictionaries and the
purifier parameters — is in `state_dict()`, hence in every srd checkpoint's `method_state`: an srd
checkpoint is evaluated without the run's semantic directory. `prepare_run(cfg)` reads that state
from `<cfg.run_dir>/semantic/` on the driver, before Ray Train starts, and fails with a one-line error
naming the missing stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from .base import METHODS, Method, MethodSettings
from .baselines import _accuracy
from .perturb import attack_mode, check_train_budget, train_pgd

PURIFIER_PARAMS = ("patch_size", "patch_stride", "sparsity", "fista_iters", "blur_sigma")
_INT_PARAMS = ("patch_size", "patch_stride", "fista_iters")
PIPELINE_HINT = "pipeline with stages [train, extract, cluster, dictionaries]"
REL_VAR_FLOOR = 0.1  # constraint only: sigma^2_k >= this x the cluster's mean variance over latent dims


def missing_clusters_message(where: Path) -> str:
    return ("srd needs the cluster stage: run rayrobust extract and rayrobust cluster "
            f"(or {PIPELINE_HINT}) first; no clusters in {where}")


def missing_dictionaries_message(where: Path) -> str:
    return (f"srd needs the dictionaries stage: run rayrobust dictionaries (or {PIPELINE_HINT}) first; "
            f"no dictionaries in {where}")


class _LogitsAndLatent(nn.Module):
    """(logits, latent) of a RobustModel in one pass: what the training attack's objective needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.model.forward_features(x)  # (N, d)
        return self.model.forward_head(z), z


@dataclass
class SRDSettings(MethodSettings):
    latent_weight: float = 0.1  # λ of the latent constraint (1/d)||(g_f(x_adv) - mu_k*)/sigma_k*||^2
    fista_iters: Optional[int] = None  # purifier FISTA iterations, deployed and attacked (None = the dictionaries')

    def __post_init__(self) -> None:
        if not self.latent_weight >= 0:
            raise ConfigError(f"latent_weight={self.latent_weight} must be >= 0 (λ of the latent constraint; e.g. 0.1)")
        if self.fista_iters is not None and self.fista_iters < 1:
            raise ConfigError(f"fista_iters={self.fista_iters} must be >= 1, or null for the dictionaries' count")


@METHODS.register("srd")
class SRD(Method):
    """Latent-constrained PGD-AT from the source model's weights; purify → classify at inference."""

    name = "srd"
    Settings = SRDSettings
    adversarial = True
    needs_semantic = True  # trained after the semantic stages (pipeline ordering)
    purifies = True  # evaluated with the adaptive purifier protocol (evaluation/adaptive.py)

    def __init__(self, settings: Optional[SRDSettings] = None, *, eps: float = 0.1, steps: int = 7,
                 norm: str = "Linf"):
        super().__init__(settings)
        check_train_budget(eps, norm)
        self.norm = norm
        if steps < 1:
            raise ConfigError(f"steps={steps} must be >= 1")
        self.eps, self.steps, self.lam = float(eps), int(steps), float(self.settings.latent_weight)
        self.fista_iters_override = self.settings.fista_iters
        self.state: Dict[str, torch.Tensor] = {}
        self._cache: Dict[torch.device, Dict[str, torch.Tensor]] = {}

    # --- the state: cluster distributions, dictionaries, purifier parameters ----------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in ("means", "variances", "cluster_class", "dictionaries", *PURIFIER_PARAMS)
                   if k not in state]
        if missing:
            raise CheckpointError(f"srd method state lacks {missing}: the checkpoint was not written by srd training")
        self.state = {k: torch.as_tensor(v).detach().cpu().clone() for k, v in state.items()}
        if self.fista_iters_override is not None:
            self.state["fista_iters"] = torch.tensor(int(self.fista_iters_override))
        self._cache = {}

    def _tensors(self, device: torch.device) -> Dict[str, torch.Tensor]:
        if not self.state:
            raise ConfigError("srd has no cluster distributions: train it with `rayrobust train` (which reads "
                              "<run_dir>/semantic/) or load_state_dict() the method_state of an srd checkpoint")
        if device not in self._cache:
            s = self.state
            var = s["variances"].float()  # (K, d)
            floored = torch.maximum(var, REL_VAR_FLOOR * var.mean(1, keepdim=True))
            self._cache[device] = {"means": s["means"].float().to(device), "inv_std": var.rsqrt().to(device),
                                   "inv_std_floored": floored.rsqrt().to(device),
                                   "cluster_class": s["cluster_class"].long().to(device)}
        return self._cache[device]

    def purifier_params(self) -> Dict[str, Any]:
        return {k: (int(self.state[k]) if k in _INT_PARAMS else float(self.state[k])) for k in PURIFIER_PARAMS}

    # --- training ----------------------------------------------------------------------------------
    def normalized_offsets(self, z: torch.Tensor) -> torch.Tensor:
        """(z − μ_k)/σ_k for every cluster: (N, K, d)."""
        t = self._tensors(z.device)
        return (z.float()[:, None, :] - t["means"][None]) * t["inv_std"][None]

    def nearest_class_cluster(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """k* (N,): the cluster of class y nearest to z in diagonal Mahalanobis distance."""
        t = self._tensors(z.device)
        d2 = self.normalized_offsets(z).pow(2).sum(-1)  # (N, K)
        other = t["cluster_class"][None, :] != y[:, None]  # (N, K)
        if bool(other.all(1).any()):
            absent = sorted(set(y[other.all(1)].tolist()))
            raise ConfigError(f"srd clusters have no cluster for class(es) {absent}: the semantic artifacts "
                              "were made from another dataset; re-run extract/cluster/dictionaries")
        return d2.masked_fill(other, float("inf")).argmin(1)

    def latent_constraint(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Per example (N,): (1/d) ‖(z − μ_k)/σ_k‖², σ²_k floored (see the module docstring)."""
        t = self._tensors(z.device)
        u = (z.float() - t["means"][k]) * t["inv_std_floored"][k]  # (N, d)
        return u.pow(2).mean(1)

    def objective(self, y: torch.Tensor, k: torch.Tensor):
        """What PGD maximises: the batch mean of CE + λ·constraint, from (logits, latent)."""
        def fn(out):
            logits, z = out
            return F.cross_entropy(logits, y) + self.lam * self.latent_constraint(z, k).mean()
        return fn

    def loss(self, model, x, y):
        bare = getattr(model, "module", model)
        with attack_mode(model) as b:
            with torch.no_grad():
                k_star = self.nearest_class_cluster(b.forward_features(x), y)  # (N,) from the clean latent
            x_adv = train_pgd(_LogitsAndLatent(b), x, self.objective(y, k_star), eps=self.eps,
                              step=2.5 * self.eps / self.steps, steps=self.steps, norm=self.norm)
        captured: Dict[str, torch.Tensor] = {}
        # The latent is the head's input: a pre-hook reads it while the forward goes through `model`
        # itself (DistributedDataParallel synchronises gradients only for its own forward).
        hook = bare.head.register_forward_pre_hook(lambda m, args: captured.__setitem__("z", args[0]))
        try:
            logits = model(x_adv)
        finally:
            hook.remove()
        ce = F.cross_entropy(logits, y)
        latent = self.latent_constraint(captured["z"], k_star).mean()
        loss = ce + self.lam * latent
        return loss, {"train_adv_acc": _accuracy(logits, y), "srd_ce": ce.detach(), "srd_latent": latent.detach()}

    # --- inference ----------------------------------------------------------------------------------
    def purifier(self, model: nn.Module):
        """The deployed purifier around `model` (its latent picks the cluster), on the model's device."""
        from ..semantic.purify import Purifier

        self._tensors(torch.device("cpu"))  # a clear error when there is no state
        s = self.state
        device = next(model.parameters()).device
        return Purifier(model, s["means"], s["variances"], s["dictionaries"], cluster_class=s["cluster_class"],
                        **self.purifier_params()).to(device).eval()

    def decision(self, model: nn.Module) -> nn.Module:
        from ..semantic.purify import PurifiedClassifier

        return PurifiedClassifier(self.purifier(model), model)

    # --- driver-side preparation (called by train.ray_train.fit before Ray Train starts) ------------
    @classmethod
    def prepare_run(cls, cfg) -> Dict[str, Any]:
        """{"method_state", "model" (initial weights), "source"} from `<cfg.run_dir>/semantic/`."""
        return load_semantic_state(cfg)


def _read_json(path: "Location") -> Optional[Dict[str, Any]]:  # noqa: F821
    from ..io import read_json

    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _source_candidates(cfg, sdir: "Location") -> Tuple[Optional[Dict[str, Any]], list]:  # noqa: F821
    """(the latents' recorded source, checkpoints that may hold it: the recorded one, then the
    latest of semantic.source_method)."""
    from ..checkpoint import latest_valid_checkpoint, payload_file
    from ..location import Location
    from ..semantic.extract import LATENTS_DIR

    manifest = _read_json(sdir / LATENTS_DIR / "manifest.json") or {}
    source = manifest.get("source")
    paths = []
    if source and source.get("kind") == "checkpoint" and source.get("path"):
        paths.append(Location(source["path"]))
    latest = latest_valid_checkpoint(cfg.layout().checkpoints(cfg.semantic.source_method))
    if latest is not None:
        paths.append(latest)
    unique: Dict[Any, Any] = {}
    for p in paths:
        if payload_file(p).is_file():
            unique.setdefault(payload_file(p), p)
    return source, list(unique.values())


def _matches(path: "Location", source: Optional[Dict[str, Any]]) -> bool:  # noqa: F821
    """Whether the checkpoint at `path` is the model the latents were extracted with."""
    from ..checkpoint import checkpoint_sha256, model_from_checkpoint
    from ..semantic.artifacts import module_sha256

    if not source or "sha256" not in source:
        return True  # nothing recorded to compare with
    if source.get("kind") == "module":
        return module_sha256(model_from_checkpoint(path)) == source["sha256"]
    return checkpoint_sha256(path) == source["sha256"]


def load_semantic_state(cfg) -> Dict[str, Any]:
    """Read and check the run's clusters, dictionaries and source checkpoint for srd training.

    Raises MissingArtifactError / CheckpointError / ConfigError (one line each, naming the fix) when
    a stage has not run, the source checkpoint is gone, or the model config differs from the source.
    """
    from ..checkpoint import load_checkpoint
    from ..semantic.clustering import CLUSTERS_DIR, load_clusters
    from ..semantic.dictionaries import DICTIONARIES_DIR, load_dictionaries
    from ..semantic.errors import MissingArtifactError
    from ..semantic.stages import semantic_dir

    sdir = semantic_dir(cfg.run_location())
    if not (sdir / CLUSTERS_DIR / "manifest.json").is_file():
        raise MissingArtifactError(missing_clusters_message(sdir / CLUSTERS_DIR))
    if not (sdir / DICTIONARIES_DIR / "manifest.json").is_file():
        raise MissingArtifactError(missing_dictionaries_message(sdir / DICTIONARIES_DIR))
    source_method = cfg.semantic.source_method
    source, paths = _source_candidates(cfg, sdir)
    if not paths:
        recorded = f" (the latents were extracted from {source['path']})" if source and source.get("path") else ""
        raise CheckpointError(
            f"srd needs the source checkpoint: no checkpoint of semantic.source_method={source_method!r} in "
            f"{cfg.layout().checkpoints(source_method)}{recorded}; train it (rayrobust train --set "
            f"train.method={source_method}), then re-run rayrobust extract, cluster and dictionaries with "
            "--set semantic.overwrite=true")
    ckpt = next((p for p in paths if _matches(p, source)), None)
    if ckpt is None:
        raise CheckpointError(
            f"srd: the semantic artifacts in {sdir} were made from another model than {paths[0]}; re-run "
            "rayrobust extract, cluster and dictionaries with --set semantic.overwrite=true")
    payload = load_checkpoint(ckpt)
    meta = payload["model_meta"]
    if meta["name"] != cfg.model.name:
        raise ConfigError(f"srd starts from the source checkpoint's weights ({ckpt}, model {meta['name']!r}), "
                          f"so model.name={cfg.model.name!r} must be {meta['name']!r}: set model.name={meta['name']}")
    if payload["config"]["data"]["name"] != cfg.data.name:
        raise ConfigError(f"the source checkpoint {ckpt} was trained on {payload['config']['data']['name']!r}, "
                          f"not data.name={cfg.data.name!r}: use the same dataset as the semantic stages")
    if meta.get("num_labels", meta["num_classes"]) != meta["num_classes"]:
        raise ConfigError(f"semantic.source_method={source_method!r} does not output class logits "
                          f"({meta['num_classes']} outputs for {meta['num_labels']} classes); srd needs a "
                          "classifier source such as standard or pgd_at")

    clusters = load_clusters(sdir / CLUSTERS_DIR)
    dictionaries, manifest = load_dictionaries(sdir / DICTIONARIES_DIR)
    if len(dictionaries) != len(clusters["means"]):
        raise MissingArtifactError(f"{sdir / DICTIONARIES_DIR} holds {len(dictionaries)} dictionaries for "
                                   f"{len(clusters['means'])} clusters: re-run rayrobust dictionaries with "
                                   "--set semantic.overwrite=true")
    params = manifest["params"]
    state = {
        "means": torch.from_numpy(np.asarray(clusters["means"], np.float32)),  # (K, d)
        "variances": torch.from_numpy(np.asarray(clusters["variances"], np.float32)),  # (K, d)
        "cluster_class": torch.from_numpy(np.asarray(clusters["cluster_class"], np.int64)),  # (K,)
        "dictionaries": torch.from_numpy(np.asarray(dictionaries, np.float32)),  # (K, atoms, C*p*p)
        **{k: torch.tensor(params[k]) for k in PURIFIER_PARAMS},
    }
    width = _num_features(payload)
    if width >= 0 and state["means"].shape[1] != width:
        raise ConfigError(f"the clusters live in a {state['means'].shape[1]}-d latent space but {ckpt} has "
                          f"{width}-d latents: re-run extract, cluster and dictionaries with "
                          "--set semantic.overwrite=true")
    return {"method_state": state, "model": payload["model"],
            "source": {"checkpoint": ckpt.uri, "sha256": (source or {}).get("sha256")}}


def _num_features(payload: Dict[str, Any]) -> int:
    """The latent width of a checkpoint's model (the head's input width)."""
    w = payload["model"].get("head.weight")
    return int(w.shape[1]) if w is not None else -1
