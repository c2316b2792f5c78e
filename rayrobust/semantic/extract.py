"""Latent extraction: f(x) = model.forward_features(x) for every image, stored as Parquet shards.

Core (no Ray): `extract_latents(model, x, batch_size) -> (N, d) float32`.
Ray wrapper: `run_extract(...)` runs a Ray Data pipeline whose workers do all the data work: the
images are read by the workers (each extraction actor loads its own copy of a registered dataset
and takes the rows it is handed by index; an in-memory dataset given from Python is the exception),
`map_batches(LatentExtractor, compute=ActorPoolStrategy(size=n), num_gpus=1 per actor when the
cluster has GPUs)` computes the latents, and Ray Data's Parquet writer writes them from the workers
straight to the run's storage (a local path or URI):

    <out_dir>/latents/<name>.parquet ...   columns: index int64, label int64,
                                           latent fixed_size_list<float32>[d], node, worker (strings)
    <out_dir>/latents/manifest.json        source sha256, dataset, n, dim, shards, nodes, timings

Example:
    >>> manifest = run_extract("runs/demo/standard/checkpoints/epoch_003", ImageSource("fashion_mnist"),
    ...                        "s3://bucket/runs/demo/semantic")
    >>> index, labels, latents = read_latents("s3://bucket/runs/demo/semantic")
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from ..data import ArrayDataset
from ..errors import ConfigError
from ..io import provenance, write_json
from ..location import Location, Where, as_location
from ..progress import Bar, progress_enabled
from .artifacts import MANIFEST, atomic_dir, check_reuse, module_sha256, read_manifest
from .errors import LatentError
from .source import ImageSource, describe_data

FORMAT = "rayrobust-latents-v1"
LATENTS_DIR = "latents"


# ------------------------------------------------------------------------------------------------
# Core: no Ray
# ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def extract_latents(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
                    device: Optional[Union[str, torch.device]] = None, progress: bool = False) -> np.ndarray:
    """forward_features over x (N, C, H, W) in [0,1] in batches -> (N, d) float32 numpy. `progress`: a bar over
    the images (img/s, ETA) on stderr (off by default: the Ray Data actors call this once per batch)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    out = []
    with Bar(total=len(x), desc="latents", unit="img", enabled=progress) as bar:
        for s in range(0, len(x), batch_size):
            out.append(model.forward_features(x[s:s + batch_size].to(device)).float().cpu())  # (B, d)
            bar.update(len(out[-1]))
    return torch.cat(out).numpy() if out else np.zeros((0, model.num_features), np.float32)


def latent_schema(dim: int) -> pa.Schema:
    return pa.schema([("index", pa.int64()), ("label", pa.int64()), ("latent", pa.list_(pa.float32(), dim))])


def latents_table(index: np.ndarray, labels: np.ndarray, latents: np.ndarray) -> pa.Table:
    """(N,), (N,), (N, d) -> a table with the latent schema (latent as fixed_size_list<float32>[d])."""
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    n, d = latents.shape
    flat = pa.array(latents.reshape(-1), type=pa.float32())  # (N*d,)
    return pa.table([pa.array(np.asarray(index, np.int64)), pa.array(np.asarray(labels, np.int64)),
                     pa.FixedSizeListArray.from_arrays(flat, d)], schema=latent_schema(d))


def _list_column(col: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed_size_list<float32>[width] column -> (N, width) float32."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.offset or arr.null_count:  # sliced or with nulls: take the slow but safe route
        return np.asarray(arr.to_pylist(), dtype=np.float32).reshape(len(arr), width)
    return arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), width)


def latents_dir(out_dir: Where) -> Location:
    """`out_dir/latents`, or `out_dir` itself when it already is a latents directory."""
    out_dir = as_location(out_dir)
    if out_dir.name == LATENTS_DIR or ((out_dir / MANIFEST).is_file() and not (out_dir / LATENTS_DIR).exists()):
        return out_dir
    return out_dir / LATENTS_DIR


_LATENT_COLUMNS = ["index", "label", "latent"]


def read_shard(path: Where, columns: Optional[list] = None) -> pa.Table:
    """One latent Parquet file (local path or URI): index, label, latent (or the given columns)."""
    with as_location(path).open_input() as f:
        return pq.read_table(f, columns=columns or _LATENT_COLUMNS)


def read_latents(directory: Where) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index (N,) int64, labels (N,) int64, latents (N, d) float32), sorted by index."""
    d = latents_dir(directory)
    manifest = read_manifest(d, stage="latents", hint="run the extract stage first (`rayrobust extract`)")
    dim = int(manifest["dim"])
    tables = [read_shard(d / s["file"]) for s in manifest["shards"]]
    table = pa.concat_tables(tables) if tables else latent_schema(dim).empty_table()
    index = table.column("index").to_numpy()
    labels = table.column("label").to_numpy()
    latents = _list_column(table.column("latent"), dim)  # (N, d)
    if len(index) != manifest["n"]:
        raise LatentError(f"{d}: the manifest says n={manifest['n']} but the shards hold {len(index)} rows; "
                          "the directory was modified, re-run extract with overwrite")
    order = np.argsort(index, kind="stable")
    return index[order], labels[order], latents[order]


# ------------------------------------------------------------------------------------------------
# Ray Data callable: one per actor of the pool
# ------------------------------------------------------------------------------------------------
class LatentExtractor:
    """Holds the model on its device; maps an Arrow batch -> (index, label, latent, node, worker).

    A batch is either rows of `ray.data.range(n)` (column `id`: dataset positions, the images come from
    this actor's own copy of `source`) or rows carrying the images (index, label, image)."""

    def __init__(self, model_ref: Any, image_shape: Tuple[int, int, int], batch_size: int, threads: Optional[int],
                 source: Optional[ImageSource] = None, scale: Optional[float] = None):
        import ray

        if threads:
            torch.set_num_threads(threads)
        self.data = source.load() if source is not None and not source.stream else None
        self.scale = scale  # streamed rows carry uint8 images: x = image / scale
        model = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.shape = tuple(image_shape)
        self.batch_size = batch_size
        self.node = ray.get_runtime_context().get_node_id()
        self.worker = f"{self.node[:12]}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        if self.data is not None:  # positions in this actor's own copy of the dataset
            index = batch.column("id").to_numpy().astype(np.int64)
            x, labels = self.data.x[torch.from_numpy(index)], self.data.y[torch.from_numpy(index)].numpy()
        elif self.scale is not None:  # streamed rows: uint8 images (B, C, H, W)
            from ..data_ray import to_float

            index, labels = batch.column("index").to_numpy(), batch.column("label").to_numpy()
            # a tensor column (Ray's Arrow tensor extension type): each chunk converts to (rows, C, H, W)
            images = np.concatenate([c.to_numpy(zero_copy_only=False) for c in batch.column("image").chunks])
            images = images.reshape(n, *self.shape)
            x = to_float(torch.from_numpy(images), self.scale)
        else:
            width = int(np.prod(self.shape))
            x = torch.from_numpy(_list_column(batch.column("image"), width).reshape(n, *self.shape).copy())  # (B, C, H, W)
            index, labels = batch.column("index").to_numpy(), batch.column("label").to_numpy()
        z = extract_latents(self.model, x, self.batch_size, self.device)  # (B, d)
        table = latents_table(index, labels, z)
        table = table.append_column("node", pa.array([self.node] * n, pa.string()))
        return table.append_column("worker", pa.array([self.worker] * n, pa.string()))


def _image_blocks(x: torch.Tensor, y: torch.Tensor, rows: int) -> list:
    """The dataset as Arrow tables of `rows` rows: index, label, image fixed_size_list<float32>[C*H*W]."""
    flat = x.detach().cpu().contiguous().reshape(len(x), -1).numpy()  # (N, C*H*W)
    labels = y.detach().cpu().numpy().astype(np.int64)
    blocks = []
    for s in range(0, len(x), rows):
        e = min(s + rows, len(x))
        images = pa.FixedSizeListArray.from_arrays(pa.array(flat[s:e].reshape(-1), pa.float32()), flat.shape[1])
        blocks.append(pa.table({"index": pa.array(np.arange(s, e, dtype=np.int64)),
                                "label": pa.array(labels[s:e]), "image": images}))
    return blocks


def _resolve_source(model_or_checkpoint: Union[nn.Module, Where]) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model and what identifies it: a checkpoint's sha256, or a module's state_dict sha256."""
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
        return model, {"kind": "module", "class": type(model).__name__, "sha256": module_sha256(model)}
    from ..checkpoint import checkpoint_sha256, load_checkpoint, model_from_payload

    path = as_location(model_or_checkpoint)
    payload = load_checkpoint(path)  # CheckpointError when missing/corrupt/unsafe
    model = model_from_payload(payload, path)
    return model, {"kind": "checkpoint", "path": path.uri, "sha256": checkpoint_sha256(path),
                   "model_meta": payload.get("model_meta", {})}


# ------------------------------------------------------------------------------------------------
# Ray wrapper
# ------------------------------------------------------------------------------------------------
def run_extract(
    model_or_checkpoint_path: Union[nn.Module, Where],
    dataset: Union[ImageSource, ArrayDataset],
    out_dir: Where,
    *,
    num_actors: int = 2,
    batch_size: int = 256,
    use_gpu: Optional[bool] = None,
    rows_per_shard: Optional[int] = None,
    overwrite: bool = False,
    ray_remote_args: Optional[Dict[str, Any]] = None,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Extract latents of `dataset` with a Ray Data actor pool; write `<out_dir>/latents/`; return the manifest.

    `dataset`: an ImageSource (each actor loads its own copy: nothing passes through the driver) or an
    in-memory ArrayDataset (shipped from this process, for notebooks and tests). `out_dir`: a local path
    or URI. Same source weights + dataset (name, n, content hash) as the existing artifact -> reused as
    is; different -> ArtifactMismatchError unless `overwrite`. `ray_remote_args` go to each actor
    (e.g. `{"resources": {"node_a": 1}}` to pin placement); `rows_per_shard` defaults to ~n/8.
    """
    from ..raycluster import ensure_ray

    if num_actors < 1 or batch_size < 1:
        raise ConfigError(f"num_actors={num_actors} and batch_size={batch_size} must both be >= 1")
    model, source = _resolve_source(model_or_checkpoint_path)
    info = describe_data(dataset)
    n, name, shape = info["n"], info["name"], tuple(info["shape"])
    data_sha = info["data_sha256"]
    if n == 0:
        raise ConfigError(f"dataset {name!r} is empty; nothing to extract")
    key = {"source_sha256": source["sha256"], "dataset": name, "n": n, "data_sha256": data_sha}
    dest = latents_dir(out_dir)
    old = check_reuse(dest, key, stage="latents", overwrite=overwrite)
    if old is not None:
        _log(verbose, f"latents: reusing {dest} (same source sha256 {key['source_sha256'][:12]}, dataset, n={n})")
        return old

    ensure_ray()
    plan = _plan(dataset, n, num_actors=num_actors, batch_size=batch_size, use_gpu=use_gpu,
                 rows_per_shard=rows_per_shard)
    actors, use_gpu = plan["actors"], plan["use_gpu"]
    dim = int(getattr(model, "num_features", 0)) or extract_latents(model, torch.zeros(1, *shape), 1).shape[1]

    t0 = time.perf_counter()
    ds = _latent_pipeline(model, dataset, n, shape, info, plan, batch_size, ray_remote_args)
    _log(verbose, f"latents: extracting n={n} images with {actors} Ray Data actor(s) "
                  f"({'1 GPU' if use_gpu else '1 CPU'} each), batch {batch_size}, into {dest}")
    with atomic_dir(dest) as tmp:
        # The workers write the Parquet files themselves, straight to the run's storage.
        # Write tasks take no CPU slot: they only move bytes, and the pool's actors may hold every CPU.
        ds.write_parquet(tmp.uri, min_rows_per_file=plan["rows_per_shard"], ray_remote_args={"num_cpus": 0})
        seconds = time.perf_counter() - t0
        manifest = _manifest(tmp, dataset, key=key, source=source, info=info, dim=dim, plan=plan,
                             batch_size=batch_size, seconds=seconds)
        write_json(tmp / MANIFEST, manifest)
    _log(verbose, f"latents: {n} x {dim} in {seconds:.1f}s ({n / seconds:.0f} images/s) on "
                  f"{len(manifest['nodes'])} node(s)")
    return manifest


def _latent_pipeline(model: nn.Module, dataset, n: int, shape, info: Dict[str, Any], plan: Dict[str, Any],
                     batch_size: int, ray_remote_args: Optional[Dict[str, Any]]):
    """The Ray Data pipeline of `run_extract`: input rows -> a pool of `plan["actors"]` LatentExtractor actors."""
    import ray

    use_gpu = plan["use_gpu"]
    ds = _input_rows(dataset, n, plan["block_rows"])
    # Ray Data's own bars (rows/s, ETA) when interactive; this dataset's own copy of the context, not the global one
    ds.context.enable_progress_bars = progress_enabled()
    ds.context.wait_for_min_actors_s = 600  # start every pool actor before dispatching: the work is spread
    return ds.map_batches(
        LatentExtractor,
        fn_constructor_kwargs={"model_ref": ray.put(model.cpu().eval()), "image_shape": shape,
                               "batch_size": batch_size, "threads": None if use_gpu else 1,
                               "source": dataset if isinstance(dataset, ImageSource) else None,
                               "scale": info["scale"] if isinstance(dataset, ImageSource) and dataset.stream else None},
        compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
        batch_size=batch_size, batch_format="pyarrow", **plan["per_actor"], **(ray_remote_args or {}),
    )


def _plan(dataset, n: int, *, num_actors: int, batch_size: int, use_gpu: Optional[bool],
          rows_per_shard: Optional[int]) -> Dict[str, Any]:
    """How many actors (one GPU or one CPU each), rows per input block and per output file."""
    from ..raycluster import cluster_cpus, resolve_use_gpu

    use_gpu, gpus = resolve_use_gpu(use_gpu)
    actors = min(num_actors, gpus) if use_gpu else num_actors
    if isinstance(dataset, ImageSource) and dataset.stream and not use_gpu:
        actors = max(1, min(actors, cluster_cpus() - 1))  # the Parquet/image read tasks need a CPU of their own
    return {"use_gpu": use_gpu, "actors": actors, "per_actor": {"num_gpus": 1} if use_gpu else {"num_cpus": 1},
            "rows_per_shard": rows_per_shard or max(256, min(65536, math.ceil(n / 8))),
            "block_rows": max(batch_size, min(4096, math.ceil(n / (4 * actors))))}


def _input_rows(dataset, n: int, block_rows: int):
    """The Ray Dataset the extractor actors consume: file rows read by the workers (a streamed source), image
    positions (a source each actor loads itself), or the images themselves (an in-memory dataset)."""
    import ray.data

    with warnings.catch_warnings():  # Ray 2.60's DataContext warns about its own deprecated fields
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(dataset, ImageSource) and dataset.stream:  # read by the workers, from Parquet/image files
            return dataset.rows()
        if isinstance(dataset, ImageSource):  # only positions leave the driver; each actor loads the images
            return ray.data.from_arrow([pa.table({"id": np.arange(s, min(s + block_rows, n), dtype=np.int64)})
                                        for s in range(0, n, block_rows)])
        return ray.data.from_arrow(_image_blocks(dataset.x, dataset.y, block_rows))


def _manifest(tmp: Location, dataset, *, key, source, info, dim: int, plan, batch_size: int,
              seconds: float) -> Dict[str, Any]:
    """The latents' manifest, from the Parquet files the workers wrote (their row count checked against n)."""
    n = info["n"]
    shards, nodes, workers = _tally_remote(tmp)
    total = sum(s["rows"] for s in shards)
    if total != n:
        raise LatentError(f"extraction produced {total} rows for {n} images; nothing was written")
    return {
        "format": FORMAT, "reuse_key": key, "source": source, "dataset": info["name"], "n": n, "dim": dim,
        "image_shape": list(info["shape"]), "num_classes": info["num_classes"],
        "data": dataset.to_dict() if isinstance(dataset, ImageSource) else {"in_memory": True},
        "columns": {"index": "int64", "label": "int64", "latent": f"fixed_size_list<float32>[{dim}]",
                    "node": "string", "worker": "string"},
        "shards": shards, "nodes": nodes, "workers": workers,
        "compute": {"actors": plan["actors"], "per_actor": plan["per_actor"], "batch_size": batch_size,
                    "block_rows": plan["block_rows"]},
        "timings": {"seconds": round(seconds, 3), "images_per_s": round(n / max(seconds, 1e-9), 1)},
        "provenance": provenance(),
    }


def _tally_remote(directory: Location) -> Tuple[list, Dict[str, int], Dict[str, int]]:
    """`_tally_shards` in a Ray task, so the driver never holds the per-row node/worker columns (a local
    directory is read on this node, where it is)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: Dict[str, Any] = {"num_cpus": 0, "max_retries": 2}
    if directory.is_local:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                        soft=False)
    return tuple(ray.get(ray.remote(_tally_shards).options(**options).remote(directory)))


def _tally_shards(directory: Location) -> Tuple[list, Dict[str, int], Dict[str, int]]:
    """([{file, rows}], node id -> rows, "node:pid" -> rows) of the Parquet files the workers wrote."""
    shards, nodes, workers = [], {}, {}
    for f in directory.iterdir():
        if not f.name.endswith(".parquet"):
            continue
        table = read_shard(f, columns=["node", "worker"])
        shards.append({"file": f.name, "rows": table.num_rows})
        for column, tally in (("node", nodes), ("worker", workers)):
            names, counts = np.unique(table.column(column).to_numpy(zero_copy_only=False), return_counts=True)
            for value, count in zip(names, counts):
                tally[str(value)] = tally.get(str(value), 0) + int(count)
    return shards, nodes, workers


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)
