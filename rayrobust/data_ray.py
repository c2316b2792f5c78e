"""Datasets as Ray Datasets: images read by Ray workers, never loaded on (or shipped from) the driver.

`image_dataset(data_cfg, split)` is a `ray.data.Dataset` with one row per image:

    index  int64            the row's stable position in the split (0..n-1; what `limit` counts)
    label  int64            class id in 0..num_classes-1
    image  uint8 (C, H, W)  pixel bytes; the [0,1] image is image / dataset_info(...)["scale"]

Sources (`data.name`, `data.root`):
- packaged datasets (digits, fashion_mnist, cifar10, cifar100, imagefolder on a local path): rows come
  from `ray.data.range(n)`; a Ray Data actor loads the dataset on its own node (one copy per worker
  process) and emits the rows of the indices it is given;
- `parquet`: `<root>/meta.json` + `<root>/<split>/*.parquet` (local path or s3://, gs://, file:// URI;
  docs/data.md), read with `ray.data.read_parquet`;
- `imagefolder` with a URI root: `<root>/<split>/<class>/*.png|jpg` read with `ray.data.read_images`,
  resized like the in-memory loader (short side to image_size, centre crop; 32 by default).

`dataset_info(data_cfg)` gives the driver shape, classes, statistics and split sizes without images;
`export_parquet(data_cfg, out_uri)` writes any of these datasets in the Parquet format.

Example:
    >>> ds = image_dataset(cfg.data, "train", limit=1000)
    >>> for batch in ds.iter_torch_batches(batch_size=128):
    ...     x = batch["image"].float() / dataset_info(cfg.data)["scale"]   # (B, C, H, W) in [0,1]

Ray is imported inside the functions, so `import rayrobust.data` stays Ray-free.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from .data import (PARQUET_COLUMNS, PARQUET_FORMAT, PARQUET_META, SPLITS, decode_images, describe_dataset,
                   encode_images, image_meta_files, imagefolder_listing, load_dataset, read_image_meta, resize_crop)
from .errors import ConfigError, DataError
from .progress import progress_enabled

PACKAGED = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
ROWS_PER_FILE = 10_000  # export_parquet's default: ~30 MB files for 32x32 RGB images
_LOAD_BATCH = 1024  # rows per map_batches call


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def _options(data_cfg: Any) -> Dict[str, Any]:
    """Loader options the config carries (imagefolder's image_size when a config has such a field)."""
    size = _get(data_cfg, "image_size")
    return {"image_size": int(size)} if size and _get(data_cfg, "name") == "imagefolder" else {}


def _is_uri(root: Optional[str]) -> bool:
    return bool(root) and "://" in str(root)


def _source(data_cfg: Any) -> str:
    """'parquet', 'imagefolder_uri' or 'packaged'."""
    name, root = _get(data_cfg, "name"), _get(data_cfg, "root")
    if name == "parquet":
        return "parquet"
    if name == "imagefolder" and _is_uri(root):
        return "imagefolder_uri"
    if name in PACKAGED:
        if _is_uri(root):
            raise ConfigError(f"data.root={root!r}: {name} is read from a local path; export it with "
                              f"`rayrobust export-data` and use data.name=parquet for object storage")
        return "packaged"
    raise ConfigError(f"data.name={name!r} cannot be streamed; use one of {', '.join(PACKAGED + ('parquet',))}")


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------
def dataset_info(data_cfg: Any) -> Dict[str, Any]:
    """What the driver needs without loading images:
    {"shape": (C,H,W), "num_classes", "mean", "std", "n_train", "n_test", "classes", "scale", "name"}.

    n_train/n_test are the split sizes before data.train_limit. From meta.json for parquet, a listing for
    image folders, known constants and file headers for the packaged datasets; when their files are not on
    the driver's machine (only on the workers'), a Ray task on a worker answers instead.
    """
    name, root, download = _get(data_cfg, "name"), _get(data_cfg, "root"), bool(_get(data_cfg, "download", False))
    options = _options(data_cfg)
    try:
        info = describe_dataset(name, root=root, download=download, **options)
    except DataError:
        if _source(data_cfg) != "packaged" or not _ray_ready():
            raise
        import ray

        remote = ray.remote(num_cpus=0)(_describe_remote)
        info = ray.get(remote.remote(name, root, download, options))
    if info.get("counts") is None:
        raise ConfigError(f"data.name={name!r} has no cheap size; stream one of {', '.join(PACKAGED + ('parquet',))}")
    return {"name": name, "shape": tuple(int(v) for v in info["shape"]), "num_classes": int(info["num_classes"]),
            "mean": tuple(info["mean"]), "std": tuple(info["std"]), "n_train": int(info["counts"]["train"]),
            "n_test": int(info["counts"]["test"]), "classes": list(info["classes"]), "scale": float(info["scale"])}


def _describe_remote(name: str, root: Optional[str], download: bool, options: Dict[str, Any]) -> Dict[str, Any]:
    return describe_dataset(name, root=root, download=download, **options)


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover
        return False
    return ray.is_initialized()


# ---------------------------------------------------------------------------------------------
# Row selection shared by every source
# ---------------------------------------------------------------------------------------------
def _mask(index: np.ndarray, limit: Optional[int], keep: Optional[np.ndarray], drop: Optional[np.ndarray]) -> np.ndarray:
    """Which rows of a batch to emit: index < limit, in `keep` (when given), not in `drop`."""
    ok = np.ones(len(index), bool)
    if limit is not None:
        ok &= index < limit
    if keep is not None:
        ok &= np.isin(index, keep)
    if drop is not None and len(drop):
        ok &= ~np.isin(index, drop)
    return ok


def _rows(index: np.ndarray, label: np.ndarray, image: np.ndarray) -> Dict[str, np.ndarray]:
    return {"index": np.asarray(index, np.int64), "label": np.asarray(label, np.int64),
            "image": np.ascontiguousarray(image, dtype=np.uint8)}


def _index_array(values: Optional[Iterable[int]]) -> Optional[np.ndarray]:
    return None if values is None else np.unique(np.asarray(list(values) if not isinstance(values, np.ndarray)
                                                            else values, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Packaged datasets: loaded by Ray Data actors on the workers
# ---------------------------------------------------------------------------------------------
_WORKER_CACHE: Dict[Tuple, Tuple[np.ndarray, np.ndarray]] = {}  # per worker process: (name, split, ...) -> (images, labels)


def _uint8_split(name: str, split: str, root: Optional[str], download: bool, options: Dict[str, Any],
                 scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """A packaged split as (N, C, H, W) uint8 bytes and (N,) int64 labels, loaded once per process."""
    key = (name, split, root, download, tuple(sorted(options.items())))
    if key not in _WORKER_CACHE:
        import torch

        ds = load_dataset(name, split, root=root, download=download, **options)
        images = ds.x.mul(scale).round_().to(torch.uint8).numpy()  # exact: x = bytes / scale
        _WORKER_CACHE[key] = (images, ds.y.numpy().astype(np.int64))
        del ds
    return _WORKER_CACHE[key]


class PackagedRows:
    """Ray Data callable: a batch of `id`s (from ray.data.range) -> the rows of those indices."""

    def __init__(self, name: str, split: str, root: Optional[str], download: bool, options: Dict[str, Any],
                 scale: float, limit: Optional[int], keep: Optional[np.ndarray], drop: Optional[np.ndarray]):
        self.images, self.labels = _uint8_split(name, split, root, download, options, scale)
        self.limit, self.keep, self.drop = limit, keep, drop

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        index = np.asarray(batch["id"], np.int64)
        index = index[_mask(index, self.limit, self.keep, self.drop)]
        return _rows(index, self.labels[index], self.images[index])


def _packaged(data_cfg: Any, split: str, info: Dict[str, Any], limit: Optional[int], keep, drop,
              concurrency: int, num_cpus: float):
    import ray.data

    n = info[f"n_{split}"] if limit is None else min(limit, info[f"n_{split}"])
    if n == 0:
        raise DataError(f"dataset {info['name']}: split {split!r} is empty")
    blocks = max(1, min(64, math.ceil(n / (4 * _LOAD_BATCH))))
    ds = ray.data.range(n, override_num_blocks=blocks)
    return ds.map_batches(
        PackagedRows,
        fn_constructor_kwargs={"name": info["name"], "split": split, "root": _get(data_cfg, "root"),
                               "download": bool(_get(data_cfg, "download", False)), "options": _options(data_cfg),
                               "scale": info["scale"], "limit": limit, "keep": keep, "drop": drop},
        batch_size=_LOAD_BATCH, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus)


# ---------------------------------------------------------------------------------------------
# Parquet image datasets
# ---------------------------------------------------------------------------------------------
def _decode_parquet(batch: Any, shape: Tuple[int, int, int], num_classes: int, limit: Optional[int], keep, drop) -> Dict[str, np.ndarray]:
    """An Arrow batch (index, label, image binary) -> rows with image (B, C, H, W) uint8."""
    index = batch.column("index").to_numpy()
    label = batch.column("label").to_numpy()
    images = decode_images(batch.column("image"), shape)
    ok = _mask(index, limit, keep, drop)
    if len(label) and (label.min() < 0 or label.max() >= num_classes):
        raise DataError(f"Parquet labels outside 0..{num_classes - 1}")
    return _rows(index[ok], label[ok], images[ok])


def _parquet(data_cfg: Any, split: str, limit: Optional[int], keep, drop):
    import ray.data

    root = _get(data_cfg, "root")
    meta = read_image_meta(root)
    files = image_meta_files(meta, root, split, limit)
    if not files:
        raise DataError(f"{root}: no Parquet files for split {split!r} (expected {root}/{split}/*.parquet)")
    ds = ray.data.read_parquet([f.path for f in files], filesystem=files[0].fs).select_columns(list(PARQUET_COLUMNS))
    return ds.map_batches(_decode_parquet, fn_kwargs={"shape": tuple(meta["shape"]), "num_classes": int(meta["num_classes"]),
                                                      "limit": limit, "keep": keep, "drop": drop},
                          batch_size=_LOAD_BATCH, batch_format="pyarrow")


# ---------------------------------------------------------------------------------------------
# Image folders on object storage
# ---------------------------------------------------------------------------------------------
def _decode_folder(batch: Dict[str, np.ndarray], rows: Dict[str, Tuple[int, int]], size: int) -> Dict[str, np.ndarray]:
    """read_images rows (image HxWx3 uint8, path) -> index, label, (3, size, size) uint8 (imagefolder's resize/crop)."""
    from PIL import Image

    keys = ["/".join(str(p).split("/")[-2:]) for p in batch["path"]]  # "<class>/<file>"
    index = np.array([rows[k][0] for k in keys], np.int64)
    label = np.array([rows[k][1] for k in keys], np.int64)
    images = [resize_crop(Image.fromarray(np.asarray(img, np.uint8)).convert("RGB"), size) for img in batch["image"]]
    out = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
    return _rows(index, label, out)


def _imagefolder_uri(data_cfg: Any, split: str, info: Dict[str, Any], limit: Optional[int], keep, drop):
    import ray.data

    from .location import Location

    root = _get(data_cfg, "root")
    _, listing = imagefolder_listing(root, split)
    index = np.arange(len(listing), dtype=np.int64)
    chosen = index[_mask(index, limit, keep, drop)]
    if not len(chosen):
        raise DataError(f"image folder {root}/{split} has no .png/.jpg images in class subdirectories")
    base = Location(root) / split
    rows = {listing[i][0]: (int(i), listing[i][1]) for i in chosen}
    paths = [(base / listing[i][0]).path for i in chosen]
    ds = ray.data.read_images(paths, filesystem=base.fs, include_paths=True, mode="RGB")
    return ds.map_batches(_decode_folder, fn_kwargs={"rows": rows, "size": info["shape"][1]},
                          batch_size=256, batch_format="numpy")


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------
def image_dataset(data_cfg: Any, split: str, *, limit: Optional[int] = None,
                  indices: Optional[Sequence[int]] = None, exclude: Optional[Sequence[int]] = None,
                  concurrency: int = 1, num_cpus: float = 0.5):
    """The `split` of data_cfg's dataset as a ray.data.Dataset of rows {index, label, image (C,H,W) uint8}.

    limit: only rows with index < limit (the first `limit` images, like load_dataset's limit).
    indices / exclude: only these indices / all but these (a validation subset and the rest).
    concurrency / num_cpus: the loader actors of packaged datasets (each holds its own copy of the split).
    Rows come in no guaranteed order; `index` says which image each is.
    """
    if split not in SPLITS:
        raise ConfigError(f"dataset split {split!r} is not valid; use one of {', '.join(SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ConfigError(f"data limit={limit!r} must be a positive integer or None")
    source = _source(data_cfg)
    keep, drop = _index_array(indices), _index_array(exclude)
    if source == "parquet":
        return _parquet(data_cfg, split, limit, keep, drop)
    info = dataset_info(data_cfg)
    if source == "imagefolder_uri":
        return _imagefolder_uri(data_cfg, split, info, limit, keep, drop)
    return _packaged(data_cfg, split, info, limit, keep, drop, concurrency, num_cpus)


def to_float(images: Any, scale: float) -> Any:
    """uint8 images (numpy or torch) -> float32 in [0,1] (torch in, torch out)."""
    if hasattr(images, "float"):
        return images.float().div_(float(scale))
    return np.asarray(images, np.float32) / np.float32(scale)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def export_parquet(data_cfg: Any, out_uri: str, *, rows_per_file: int = ROWS_PER_FILE, overwrite: bool = False,
                   verbose: bool = False) -> Dict[str, Any]:
    """Write data_cfg's dataset (train and test splits; train limited to data.train_limit when set) as a
    Parquet image dataset at `out_uri` (local path or URI); returns its meta.json.

    The images stream from `image_dataset` in chunks of `rows_per_file` rows: one Parquet file per chunk,
    so no process holds a split. meta.json is written last: a directory without it is no dataset (an
    interrupted export), and one with it is refused unless `overwrite`.
    """
    from .location import Location
    from .raycluster import ensure_ray

    if not isinstance(rows_per_file, int) or rows_per_file < 1:
        raise ConfigError(f"rows_per_file={rows_per_file!r} must be a positive integer")
    out = Location(out_uri)
    meta_loc = out / PARQUET_META
    if meta_loc.exists():
        if not overwrite:
            raise DataError(f"{out.uri} already holds an exported dataset ({PARQUET_META}); pass --overwrite to "
                            f"replace it or choose another --out")
        meta_loc.delete()  # uncommit first: a crash from here on leaves no half-valid dataset
    ensure_ray()
    info = dataset_info(data_cfg)
    files: Dict[str, list] = {}
    counts: Dict[str, int] = {}
    for split in SPLITS:
        for f in (out / split).iterdir():  # stale files of an earlier, interrupted export
            if f.name.startswith("part-") and f.name.endswith(".parquet"):
                f.delete()
        limit = _get(data_cfg, "train_limit") if split == "train" else None
        files[split], counts[split] = _write_split(image_dataset(data_cfg, split, limit=limit), out, split,
                                                   rows_per_file, info, verbose)
    meta = {"format": PARQUET_FORMAT, "name": info["name"], "shape": list(info["shape"]),
            "num_classes": info["num_classes"], "classes": info["classes"], "mean": list(info["mean"]),
            "std": list(info["std"]), "scale": info["scale"] if info["scale"] != 255 else 255, "counts": counts,
            "columns": {"index": "int64", "label": "int64", "image": "binary (raw uint8 C*H*W bytes)"},
            "files": files}
    meta_loc.write_text(json.dumps(meta, indent=2))
    return meta


def _write_split(ds: Any, out: Any, split: str, rows_per_file: int, info: Dict[str, Any], verbose: bool):
    """Stream `ds` in index order into <out>/<split>/part-NNNNN.parquet; ([{file, rows, start}], rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds.context.execution_options.preserve_order = True  # files hold consecutive index ranges
    ds.context.enable_progress_bars = progress_enabled()  # Ray Data's own bars when interactive
    schema = pa.schema([("index", pa.int64()), ("label", pa.int64()), ("image", pa.binary())])
    files, total = [], 0
    for batch in ds.iter_batches(batch_size=rows_per_file, batch_format="numpy"):
        index = np.asarray(batch["index"], np.int64)
        if len(index) == 0:
            continue
        if np.any(np.diff(index) < 0):
            order = np.argsort(index, kind="stable")  # a file's rows in index order
            batch = {k: np.asarray(v)[order] for k, v in batch.items()}
            index = index[order]
        if tuple(batch["image"].shape[1:]) != tuple(info["shape"]):
            raise DataError(f"{info['name']}: images of shape {tuple(batch['image'].shape[1:])}, expected {info['shape']}")
        table = pa.table([pa.array(index), pa.array(np.asarray(batch["label"], np.int64)),
                          encode_images(batch["image"])], schema=schema)
        name = f"{split}/part-{len(files):05d}.parquet"
        target = out / name
        if target.is_local:
            target.parent.mkdir()
        with target.fs.open_output_stream(target.path) as sink:  # an object appears whole when complete
            pq.write_table(table, sink, row_group_size=min(rows_per_file, 4096))
        files.append({"file": name, "rows": len(index), "start": int(index[0])})
        total += len(index)
        if verbose:
            print(f"export: {out.uri}/{name} ({total} {split} rows)", flush=True)
    return files, total
