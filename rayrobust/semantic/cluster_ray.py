"""Distributed adaptive clustering: latent shards held by Ray actors, the driver updates centroids.

Each actor (`ParquetShard`) loads its own Parquet files of the latents directory (so no process,
the driver included, ever holds all latents) and answers the k-means assignment step of every
(class, K) job at once; the driver (`clustering.adaptive_cluster`) sums the per-centroid statistics,
updates the centroids and drives all classes concurrently. Same code path as the single-process
core: same seed -> same clusters.

Multi-node: actors read their latent files from the run's storage (a local path or a URI such as
s3://bucket/run/semantic/latents/...), so no shared filesystem is needed; actors are spread over nodes.

Example:
    >>> summary = run_cluster("runs/demo/semantic", "runs/demo/semantic", k_max=5, num_shards=4)
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ConfigError
from ..location import Location, Where, as_location
from .artifacts import atomic_dir, check_reuse, read_manifest
from .clustering import CLUSTERS_DIR, ClusterResult, adaptive_cluster, save_clusters
from .extract import latents_dir
from .kmeans import LatentShard

DEFAULT_ACTOR_OPTIONS = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}


class ParquetShard(LatentShard):
    """A LatentShard that loads its rows itself: from Parquet files (by path) or from arrays."""

    def __init__(self, source: Union[Sequence[str], Tuple[np.ndarray, np.ndarray, np.ndarray]],
                 threads: Optional[int] = 1):
        if isinstance(source, tuple):
            index, labels, latents = source
        else:
            loaded = LatentShard.from_parquet(list(source))
            index, labels, latents = loaded.index, loaded.labels, loaded.x
        super().__init__(index, labels, latents, threads)

    def node(self) -> Dict[str, Any]:
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "rows": len(self.index)}


class RayShards:
    """A ShardGroup of Ray actors: `call(method, *args)` runs on every actor in parallel, results in shard order."""

    def __init__(self, sources: List[Any], actor_options: Optional[Dict[str, Any]] = None):
        import ray

        options = {**DEFAULT_ACTOR_OPTIONS, **(actor_options or {})}
        threads = int(options.get("num_cpus", 1)) or 1
        Actor = ray.remote(ParquetShard).options(**options)
        self.actors = [Actor.remote(src, threads) for src in sources]
        self.info = ray.get([a.node.remote() for a in self.actors])

    def call(self, method: str, *args: Any) -> List[Any]:
        import ray

        refs = [ray.put(a) for a in args]  # ship each argument to the object store once, not once per actor
        return ray.get([getattr(a, method).remote(*refs) for a in self.actors])

    def nodes(self) -> Dict[str, int]:
        """node id -> rows held there."""
        out: Dict[str, int] = {}
        for i in self.info:
            out[i["node_id"]] = out.get(i["node_id"], 0) + i["rows"]
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def cluster_distributed(source: Union[Where, Tuple[np.ndarray, np.ndarray, np.ndarray]], *, num_shards: int = 2,
                        actor_options: Optional[Dict[str, Any]] = None,
                        **kwargs: Any) -> Tuple[ClusterResult, Dict[str, Any]]:
    """`adaptive_cluster` over Ray actors. source: a latents directory (each actor loads some of its
    Parquet files) or in-memory (index, labels, latents) split by row.

    Returns (result, {"nodes": node id -> rows held there, "actors": [{node_id, pid, rows}, ...]})."""
    from ..raycluster import ensure_ray

    if num_shards < 1:
        raise ConfigError(f"num_shards={num_shards} must be >= 1")
    ensure_ray()
    if isinstance(source, tuple):
        index, labels, latents = source
        parts = np.array_split(np.arange(len(index)), num_shards)
        sources: List[Any] = [(index[p], labels[p], latents[p]) for p in parts]
    else:
        d = latents_dir(source)
        files = [(d / s["file"]).uri for s in read_manifest(d, stage="latents", hint="run extract first")["shards"]]
        num_shards = min(num_shards, len(files))
        sources = [files[i::num_shards] for i in range(num_shards)]  # round-robin files -> actors
    group = RayShards(sources, actor_options)
    try:
        return adaptive_cluster(group, **kwargs), {"nodes": group.nodes(), "actors": group.info}
    finally:
        group.close()


def run_cluster(latents: Where, out_dir: Where, *, k_max: int = 5, threshold: float = 0.2,
                iters: int = 25, n_init: int = 3, sample_size: int = 2000, seed: int = 0, var_floor: float = 1e-4,
                num_shards: int = 2, expected_dim: Optional[int] = None, overwrite: bool = False,
                actor_options: Optional[Dict[str, Any]] = None, verbose: bool = True) -> Dict[str, Any]:
    """Cluster the latents in `latents` (a directory with latents/) on Ray; write `<out_dir>/clusters/`.

    Returns clusters.json's content. Reuses an existing artifact made from the same latents and
    settings; refuses (ArtifactMismatchError) one made from others unless `overwrite`.
    """
    if k_max < 1:
        raise ConfigError(f"semantic.k_max={k_max} must be >= 1 (K is chosen per class in [1, k_max])")
    src = latents_dir(latents)
    lat_manifest = read_manifest(src, stage="latents", hint="run the extract stage first (`rayrobust extract`)")
    if expected_dim is not None and int(lat_manifest["dim"]) != expected_dim:
        from .errors import LatentError

        raise LatentError(f"latents in {src} have dimension {lat_manifest['dim']} but the model gives "
                          f"{expected_dim}; they come from another model: re-run extract with overwrite")
    settings = {"k_max": k_max, "threshold": threshold, "iters": iters, "n_init": n_init, "sample_size": sample_size,
                "seed": seed, "var_floor": var_floor}
    key = {"latents": lat_manifest["reuse_key"], **settings}
    dest = as_location(out_dir) / CLUSTERS_DIR
    old = check_reuse(dest, key, stage="clusters", overwrite=overwrite)
    if old is not None:
        _log(verbose, f"clusters: reusing {dest} (same latents and settings)")
        return _read_summary(dest)
    t0 = time.perf_counter()
    result, nodes = cluster_distributed(
        src, num_shards=num_shards, actor_options=actor_options, k_max=k_max, threshold=threshold, iters=iters,
        n_init=n_init, sample_size=sample_size, seed=seed, var_floor=var_floor, expected_dim=expected_dim,
        progress=(lambda m: _log(verbose, m)))
    from ..io import provenance

    with atomic_dir(dest) as tmp:
        summary = save_clusters(result, tmp, {
            "reuse_key": key, "source_latents": {"dir": src.uri, "reuse_key": lat_manifest["reuse_key"],
                                                 "source": lat_manifest.get("source"), "n": lat_manifest["n"]},
            "nodes": nodes["nodes"], "shards": nodes["actors"], "wall_seconds": round(time.perf_counter() - t0, 3),
            "provenance": provenance(seed=seed)})
    _log(verbose, f"clusters: {summary['num_clusters']} clusters "
                  f"(K per class {summary['k_per_class']}) in {time.perf_counter() - t0:.1f}s -> {dest}")
    return summary


def _read_summary(directory: Location) -> Dict[str, Any]:
    from ..io import read_json

    return read_json(directory / "clusters.json")


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)
