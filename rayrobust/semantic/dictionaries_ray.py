"""Learning the per-cluster dictionaries on Ray actors (one GPU each when the cluster has GPUs).

The driver picks each cluster's member images by dataset position (`select_members`) and hands
clusters to a pool of `DictionaryWorker` actors, the next cluster to whichever actor is free; each
actor loads its own copy of the images (an `ImageSource`), so no image passes through the driver (an
in-memory dataset given from Python is put in the object store instead). Each cluster's learning is
seeded by (seed, cluster), so the result does not depend on which actor ran it. Output:
`<out_dir>/dictionaries/cluster_XXX.npy` + `manifest.json` on a local path or URI, committed atomically.

Example:
    >>> manifest = run_dictionaries(ImageSource("fashion_mnist"), "s3://b/run/semantic", "s3://b/run/semantic",
    ...                             DictionaryParams())
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from ..data import ArrayDataset
from ..errors import ConfigError
from ..location import Where, as_location
from ..raypool import run_pool
from .artifacts import atomic_dir, check_reuse
from .clustering import CLUSTERS_DIR, load_clusters
from .dictionaries import DICTIONARIES_DIR, DictionaryParams, DictionaryWorker, save_dictionaries, select_members
from .errors import ArtifactMismatchError
from .source import ImageSource, describe_data


def run_dictionaries(dataset: Union[ImageSource, ArrayDataset], clusters: Where, out_dir: Where,
                     params: DictionaryParams, *,
                     num_actors: int = 2, use_gpu: Optional[bool] = None, overwrite: bool = False,
                     actor_options: Optional[Dict[str, Any]] = None, verbose: bool = True) -> Dict[str, Any]:
    """Learn one dictionary per cluster of `<clusters>/clusters/` from `dataset`'s images; return the manifest.

    `dataset` must be the one the latents were extracted from (checked by content hash).
    """
    import ray

    from ..io import provenance
    from ..raycluster import ensure_ray, resolve_use_gpu

    if num_actors < 1:
        raise ConfigError(f"semantic.dict_actors={num_actors} must be >= 1")
    clusters = as_location(clusters)
    cdir = clusters if clusters.name == CLUSTERS_DIR else clusters / CLUSTERS_DIR
    cl = load_clusters(cdir)
    shape = _same_data(dataset, cl["summary"]["source_latents"])
    key = {"clusters": cl["summary"]["reuse_key"], "params": asdict(params)}
    dest = as_location(out_dir) / DICTIONARIES_DIR
    old = check_reuse(dest, key, stage="dictionaries", overwrite=overwrite)
    if old is not None:
        _log(verbose, f"dictionaries: reusing {dest} (same clusters and parameters)")
        return old

    ensure_ray()
    use_gpu, gpus = resolve_use_gpu(use_gpu)
    num_clusters = len(cl["centroids"])
    actors_n = max(1, min(num_actors, num_clusters, gpus if use_gpu else num_actors))
    options = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    options.update(actor_options or {})
    Worker = ray.remote(DictionaryWorker).options(**options)
    own_copy = isinstance(dataset, ImageSource)
    actors = [Worker.remote(None if use_gpu else int(options.get("num_cpus", 1)), dataset if own_copy else None)
              for _ in range(actors_n)]
    _log(verbose, f"dictionaries: {num_clusters} clusters on {actors_n} Ray actor(s) "
                  f"({'1 GPU' if use_gpu else '1 CPU'} each), p={params.patch_size}, {params.n_atoms} atoms, "
                  f"lambda={params.sparsity}")
    t0 = time.perf_counter()
    queue = []
    for k in range(num_clusters):
        members = select_members(cl["index"], cl["assignment"], k, params.max_images_per_cluster, params.seed)
        queue.append((k, members if own_copy else ray.put(dataset.x[torch.as_tensor(members, dtype=torch.long)].contiguous())))
    dicts: Dict[int, np.ndarray] = {}
    infos: Dict[int, Dict] = {}
    def learned(_item, value) -> None:
        k, D, info = value
        info["class"] = int(cl["cluster_class"][k])
        dicts[k], infos[k] = D, info
        _log(verbose, f"dictionaries: cluster {k:3d} (class {info['class']}) {info['images']} images, "
                      f"{info['patches']} patches, rel. error {info['relative_error']:.3f}, "
                      f"{info['nonzeros_per_patch']:.1f} codes/patch, {info['wall_seconds']:.1f}s "
                      f"[{len(dicts)}/{num_clusters}]")

    try:  # every actor gets a cluster, then the next cluster goes to whichever finishes first
        run_pool(actors, queue, submit=lambda actor, item: _learn(actor, own_copy).remote(item[0], item[1], params),
                 on_result=learned)
    finally:
        for actor in actors:
            ray.kill(actor)
    nodes: Dict[str, int] = {}
    for info in infos.values():
        nodes[str(info.get("node"))] = nodes.get(str(info.get("node")), 0) + 1
    with atomic_dir(dest) as tmp:
        manifest = save_dictionaries(tmp, dicts, infos, params, {
            "reuse_key": key, "image_shape": list(shape), "source_clusters": cdir.uri, "nodes": nodes,
            "timings": {"seconds": round(time.perf_counter() - t0, 3)}, "provenance": provenance(seed=params.seed)})
    _log(verbose, f"dictionaries: {num_clusters} dictionaries in {time.perf_counter() - t0:.1f}s -> {dest}")
    return manifest


def _same_data(dataset, source: Dict[str, Any]) -> list:
    """The images' shape, once `dataset` is checked to be the one the latents (`source`) were extracted from."""
    info = describe_data(dataset)  # a source is described on a worker: the driver never loads its images
    if source["reuse_key"].get("data_sha256") not in (None, info["data_sha256"]) or source["n"] != info["n"]:
        raise ArtifactMismatchError(
            f"the dataset given ({info['name']}, n={info['n']}) is not the one the latents in {source['dir']} "
            f"came from ({source['reuse_key'].get('dataset')}, n={source['n']}); pass the same data "
            "(same data.name, data.train_limit and semantic.extract_limit)")
    return list(info["shape"])


def _learn(actor, own_copy: bool):
    return actor.learn_members if own_copy else actor.learn


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)
