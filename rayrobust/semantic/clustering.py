"""Adaptive per-class clustering of latents (docs/methods.md §1.2–1.3). No Ray here.

For each class c, k-means (faiss assignment, `kmeans.py`) for every K in [1, k_max]; K_c is the K>=2
with the largest silhouette score on a fixed seeded sample of the class (<= `sample_size` points),
or 1 when no K>=2 scores above `threshold`. Per chosen cluster: mean, diagonal variance, count.

The data side is a list of shards (`LatentShard`) reached through a `ShardGroup`: `LocalShards`
calls them in this process, `cluster_ray.RayShards` calls Ray actors. Every (class, K) job of every
class runs concurrently in lockstep rounds: one call per shard per round carries all active jobs.
The same code drives both, so one process and a cluster give the same clusters for the same seed.

Artifacts (`save_clusters`): clusters.json (K per class, counts, silhouette per K, threshold, seed,
source), centroids.npy (K_tot, d), cluster_means.npy and cluster_vars.npy (K_tot, d),
cluster_class.npy (K_tot,) cluster -> class, assignments.npz (index, cluster) sorted by index.

Example:
    >>> result = cluster_latents(index, labels, latents, k_max=5, threshold=0.2, seed=0)
    >>> result.k_per_class
    {0: 1, 1: 2, ...}
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError
from ..io import write_json
from ..location import Where, as_location
from .artifacts import MANIFEST, load_npy, read_manifest, save_npy, save_npz
from .errors import LatentError
from .kmeans import KMeansJob, LatentShard, nearest, run_jobs

FORMAT = "rayrobust-clusters-v1"
CLUSTERS_DIR = "clusters"


class LocalShards:
    """A ShardGroup in this process: `call(method, *args)` -> one result per shard, in shard order."""

    def __init__(self, shards: Sequence[LatentShard]):
        self.shards = list(shards)

    def call(self, method: str, *args: Any) -> List[Any]:
        return [getattr(s, method)(*args) for s in self.shards]

    def nodes(self) -> List[Optional[str]]:
        return [None] * len(self.shards)


@dataclass
class ClusterResult:
    k_per_class: Dict[int, int]  # chosen K per class
    scores: Dict[int, Dict[int, float]]  # class -> K -> silhouette (K >= 2)
    inertia: Dict[int, Dict[int, float]]  # class -> K -> sum of squared distances (all the class's rows)
    iterations: Dict[int, Dict[int, int]]  # class -> K -> Lloyd iterations run
    centroids: np.ndarray  # (K_tot, d) float32, class-major order
    means: np.ndarray  # (K_tot, d) float32, mean of the rows assigned to each centroid
    variances: np.ndarray  # (K_tot, d) float32, diagonal variance, floored at var_floor
    counts: np.ndarray  # (K_tot,) int64
    cluster_class: np.ndarray  # (K_tot,) int64
    index: np.ndarray  # (N,) int64 dataset index, sorted
    assignment: np.ndarray  # (N,) int64 global cluster id of each row
    settings: Dict[str, Any] = field(default_factory=dict)  # k_max, threshold, seed, ... as run
    seconds: float = 0.0


def _job_seed(seed: int, c: int, k: int, r: int = 0) -> int:
    return int(np.random.SeedSequence([seed, c, k, r]).generate_state(1)[0])


def pairwise_distances(sample: np.ndarray) -> np.ndarray:
    """Euclidean distances (M, M) float64 of a sample (M, d); computed once per class, reused for every K."""
    x = np.asarray(sample, np.float64)
    sq = (x * x).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] - 2 * x @ x.T + sq[None], 0))
    np.fill_diagonal(dist, 0.0)
    return dist


def silhouette(sample: np.ndarray, labels: np.ndarray, dist: Optional[np.ndarray] = None) -> float:
    """Mean silhouette (Rousseeuw 1987; same definition as sklearn's silhouette_score, euclidean) of a
    labelled sample (M, d): s_i = (b_i - a_i) / max(a_i, b_i), s_i = 0 in singleton clusters.
    -1 when fewer than 2 (or M) clusters are used. `dist`: precomputed `pairwise_distances(sample)`."""
    labels = np.unique(labels, return_inverse=True)[1].ravel()
    k, m = (labels.max() + 1 if len(labels) else 0), len(sample)
    if k < 2 or k >= m:
        return -1.0
    dist = pairwise_distances(sample) if dist is None else dist  # (M, M)
    onehot = np.zeros((m, k))
    onehot[np.arange(m), labels] = 1.0
    sizes = onehot.sum(0)  # (k,)
    per = dist @ onehot  # (M, k): sum of distances from i to each cluster
    own = sizes[labels]
    a = per[np.arange(m), labels] / np.maximum(own - 1, 1)  # mean distance to the rest of its cluster
    mean_other = per / sizes[None]
    mean_other[np.arange(m), labels] = np.inf
    b = mean_other.min(1)  # mean distance to the nearest other cluster
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def _describe(group, expected_dim: Optional[int], k_max: int) -> Dict[int, int]:
    """Validate the shards' data; return the per-class counts. Raises LatentError saying what is wrong."""
    summaries = group.call("summary")
    dims = {s["dim"] for s in summaries if s["n"]}
    if len(dims) > 1:
        raise LatentError(f"latent shards disagree on the dimension ({sorted(dims)}); re-run extract")
    dim = dims.pop() if dims else 0
    if expected_dim is not None and dim != expected_dim:
        raise LatentError(f"latents have dimension {dim} but the model's forward_features gives {expected_dim}; "
                          "the latents come from another model: re-run extract with overwrite for this checkpoint")
    bad: Dict[int, int] = {}
    counts: Dict[int, int] = {}
    for s in summaries:
        for c, n in s["counts"].items():
            counts[int(c)] = counts.get(int(c), 0) + int(n)
        for c, n in s["nonfinite"].items():
            bad[int(c)] = bad.get(int(c), 0) + int(n)
    if not counts:
        raise LatentError("there are no latents to cluster")
    if bad:
        where = ", ".join(f"class {c}: {n}" for c, n in sorted(bad.items()))
        raise LatentError(f"latents contain NaN or inf values ({where} rows); the source model diverged or the "
                          "checkpoint is corrupt: retrain it or extract from another checkpoint")
    need = k_max + 1 if k_max >= 2 else 1  # silhouette needs at most n-1 clusters
    small = {c: n for c, n in counts.items() if n < need}
    if small:
        where = ", ".join(f"class {c} has {n}" for c, n in sorted(small.items()))
        raise LatentError(f"too few latents to try K up to k_max={k_max} ({where}; each class needs >= {need}); "
                          "lower semantic.k_max or extract more images")
    return dict(sorted(counts.items()))


def _samples(group, counts: Dict[int, int], sample_size: int, seed: int) -> Dict[int, np.ndarray]:
    """Per class, a seeded sample of <= sample_size rows (M, d) in dataset-index order; independent of sharding."""
    per_shard = group.call("class_indices")
    wanted = {}
    for c in counts:
        idx = np.sort(np.concatenate([s[c] for s in per_shard if c in s]))
        rng = np.random.RandomState(_job_seed(seed, c, 0))
        wanted[c] = idx[np.sort(rng.choice(len(idx), min(sample_size, len(idx)), replace=False))]
    got = group.call("take", wanted)
    samples = {}
    for c in counts:
        index = np.concatenate([g[c][0] for g in got])
        rows = np.concatenate([g[c][1] for g in got])
        samples[c] = rows[np.argsort(index, kind="stable")]  # (M, d)
    return samples


def _choose_k(jobs, samples, counts, *, k_max: int, threshold: float, log) -> tuple:
    """(K per class, silhouette per class and K): the best-scoring K >= 2 when it beats `threshold`, else 1."""
    scores: Dict[int, Dict[int, float]] = {c: {} for c in counts}
    chosen: Dict[int, int] = {}
    for c in counts:
        dist = pairwise_distances(samples[c]) if k_max >= 2 else None  # (M, M)
        for k in range(2, k_max + 1):
            labels, _ = nearest(samples[c], jobs[c, k].centroids)
            scores[c][k] = silhouette(samples[c], labels, dist)
        best = max(scores[c], key=lambda k: (scores[c][k], -k)) if scores[c] else 1
        chosen[c] = best if best > 1 and scores[c][best] > threshold else 1
        log(f"clusters: class {c}: n={counts[c]} K={chosen[c]} silhouette "
            + (" ".join(f"K{k}={s:.3f}" for k, s in scores[c].items()) or "-"))
    return chosen, scores


def _assemble(final, jobs, chosen, counts, var_floor: float) -> tuple:
    """Per class, the chosen run's centroids, exact means and variances (summed over the shards' statistics),
    sizes, owning class, and each point's (index, global cluster)."""
    cent, means, variances, sizes, owner, index, assign = [], [], [], [], [], [], []
    offset = 0
    for c in counts:
        job = jobs[c, chosen[c]]
        parts = [f[job.id] for f in final]
        n = np.sum([p[4] for p in parts], axis=0)  # (K,)
        mu = np.sum([p[2] for p in parts], axis=0) / np.maximum(n, 1)[:, None]  # (K, d) float64
        var = np.sum([p[3] for p in parts], axis=0) / np.maximum(n, 1)[:, None] - mu ** 2
        mu[n == 0] = job.centroids[n == 0]
        cent.append(job.centroids)
        means.append(mu)
        variances.append(np.maximum(var, var_floor))
        sizes.append(n)
        owner.append(np.full(chosen[c], c, np.int64))
        index.extend(p[0] for p in parts)
        assign.extend(p[1] + offset for p in parts)
        offset += chosen[c]
    return cent, means, variances, sizes, owner, index, assign


def adaptive_cluster(group, *, k_max: int, threshold: float, iters: int = 25, n_init: int = 3,
                     sample_size: int = 2000, seed: int = 0, var_floor: float = 1e-4,
                     expected_dim: Optional[int] = None,
                     progress: Optional[Callable[[str], None]] = None) -> ClusterResult:
    """Cluster every class of the data held by `group` (a ShardGroup) with adaptive K.

    k_max: K in [1, k_max]; threshold: silhouette a K>=2 must beat; iters: Lloyd iterations at most;
    n_init: k-means++ inits per (class, K>=2), lowest inertia kept; sample_size: points per class for
    seeding and silhouette; var_floor: floor of the diagonal variances (latent units^2).
    """
    if k_max < 1:
        raise ConfigError(f"k_max={k_max} must be >= 1 (K is chosen per class in [1, k_max])")
    if iters < 1 or n_init < 1 or sample_size < 2 or var_floor <= 0:
        raise ConfigError(f"iters={iters} >= 1, n_init={n_init} >= 1, sample_size={sample_size} >= 2 and "
                          f"var_floor={var_floor} > 0 required")
    log = progress or (lambda msg: None)
    t0 = time.perf_counter()
    counts = _describe(group, expected_dim, k_max)
    samples = _samples(group, counts, sample_size, seed)
    runs = {(c, k, r): KMeansJob(f"c{c}k{k}r{r}", c, k, samples[c], iters=iters, seed=_job_seed(seed, c, k, r))
            for c in counts for k in range(1, k_max + 1) for r in range(1 if k == 1 else n_init)}
    log(f"clusters: {len(counts)} classes x K in [1, {k_max}] x {n_init} inits = {len(runs)} k-means runs, "
        "all in lockstep")
    run_jobs(list(runs.values()), lambda batch: group.call("step", batch))
    jobs: Dict[tuple, KMeansJob] = {}  # per (class, K): the init with the lowest inertia
    for (c, k, _), job in runs.items():
        if (c, k) not in jobs or job.inertia[-1] < jobs[c, k].inertia[-1]:
            jobs[c, k] = job
    chosen, scores = _choose_k(jobs, samples, counts, k_max=k_max, threshold=threshold, log=log)
    final = group.call("finish", [(jobs[c, chosen[c]].id, c, jobs[c, chosen[c]].centroids) for c in counts])
    group.call("forget", [j.id for j in runs.values()])
    cent, means, variances, sizes, owner, index, assign = _assemble(final, jobs, chosen, counts, var_floor)
    index_all = np.concatenate(index)
    order = np.argsort(index_all, kind="stable")
    return ClusterResult(
        k_per_class=chosen, scores=scores,
        inertia={c: {k: jobs[c, k].inertia[-1] for k in range(1, k_max + 1)} for c in counts},
        iterations={c: {k: jobs[c, k].iters for k in range(1, k_max + 1)} for c in counts},
        centroids=np.concatenate(cent).astype(np.float32), means=np.concatenate(means).astype(np.float32),
        variances=np.concatenate(variances).astype(np.float32), counts=np.concatenate(sizes).astype(np.int64),
        cluster_class=np.concatenate(owner), index=index_all[order],
        assignment=np.concatenate(assign).astype(np.int64)[order],
        settings={"k_max": k_max, "silhouette_threshold": threshold, "kmeans_iters": iters, "kmeans_n_init": n_init,
                  "silhouette_sample": sample_size, "seed": seed, "var_floor": var_floor,
                  "criterion": "silhouette (euclidean) on a seeded per-class sample; K=1 unless best > threshold"},
        seconds=time.perf_counter() - t0)


def cluster_latents(index: np.ndarray, labels: np.ndarray, latents: np.ndarray, *, num_shards: int = 1,
                    **kwargs: Any) -> ClusterResult:
    """Single-process `adaptive_cluster` over in-memory latents (N, d), split into `num_shards` shards."""
    latents = np.asarray(latents)
    if latents.ndim != 2 or len(latents) != len(labels) or len(index) != len(labels):
        raise LatentError(f"expected index (N,), labels (N,) and latents (N, d); got {np.shape(index)}, "
                          f"{np.shape(labels)}, {latents.shape}")
    parts = np.array_split(np.arange(len(labels)), max(1, num_shards))
    return adaptive_cluster(LocalShards([LatentShard(index[p], labels[p], latents[p]) for p in parts]), **kwargs)


# ------------------------------------------------------------------------------------------------
# Artifacts
# ------------------------------------------------------------------------------------------------
def save_clusters(result: ClusterResult, directory: "Where", extra: Dict[str, Any]) -> Dict[str, Any]:
    """Write the cluster artifacts into `directory` (the caller makes it atomic); return clusters.json."""
    directory = as_location(directory)
    save_npy(directory / "centroids.npy", result.centroids)
    save_npy(directory / "cluster_means.npy", result.means)
    save_npy(directory / "cluster_vars.npy", result.variances)
    save_npy(directory / "cluster_class.npy", result.cluster_class)
    save_npz(directory / "assignments.npz", index=result.index, cluster=result.assignment)
    summary = {
        "format": FORMAT, **result.settings,
        "num_clusters": int(len(result.centroids)), "dim": int(result.centroids.shape[1]),
        "k_per_class": {str(c): k for c, k in result.k_per_class.items()},
        "counts_per_class": {str(c): result.counts[result.cluster_class == c].tolist() for c in result.k_per_class},
        "silhouette": {str(c): {str(k): round(s, 6) for k, s in v.items()} for c, v in result.scores.items()},
        "inertia": {str(c): {str(k): s for k, s in v.items()} for c, v in result.inertia.items()},
        "iterations": {str(c): {str(k): s for k, s in v.items()} for c, v in result.iterations.items()},
        "files": {"centroids": "centroids.npy", "means": "cluster_means.npy", "variances": "cluster_vars.npy",
                  "cluster_class": "cluster_class.npy", "assignments": "assignments.npz (index, cluster)"},
        "seconds": round(result.seconds, 3), **extra,
    }
    write_json(directory / "clusters.json", summary)
    write_json(directory / MANIFEST, {"format": FORMAT, "reuse_key": extra.get("reuse_key"),
                                      "clusters": "clusters.json"})
    return summary


def load_clusters(directory: "Where") -> Dict[str, Any]:
    """The cluster artifacts (a local path or URI) as a dict: summary (clusters.json) + numpy arrays."""
    directory = as_location(directory)
    read_manifest(directory, stage="clusters", hint="run the cluster stage first (`rayrobust cluster`)")
    a = load_npy(directory / "assignments.npz")
    return {"summary": json.loads((directory / "clusters.json").read_text()),
            "centroids": load_npy(directory / "centroids.npy"), "means": load_npy(directory / "cluster_means.npy"),
            "variances": load_npy(directory / "cluster_vars.npy"),
            "cluster_class": load_npy(directory / "cluster_class.npy"),
            "index": a["index"], "assignment": a["cluster"]}
