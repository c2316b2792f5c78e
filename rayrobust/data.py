"""Dataset loaders returning whole splits as [0,1] float tensors (`ArrayDataset`).

Every loader is registered in `DATASETS` and called through `load_dataset`:

    >>> train = load_dataset("fashion_mnist", "train", limit=1000)
    >>> train.x.shape, train.y.dtype, train.mean
    (torch.Size([1000, 1, 28, 28]), torch.int64, (0.286,))

Files are looked up in: the `root` argument, $RAYROBUST_DATA, the system package directory
(Fashion-MNIST only), then ./data. A missing or corrupt file raises a DataError that names the
file and says how to get it. `mean`/`std` are fixed training-set statistics per dataset, meant
for `create_model(..., mean=ds.mean, std=ds.std)`.
"""
from __future__ import annotations

import dataclasses
import gzip
import inspect
import os
import pickle
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from numbers import Integral
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import ConfigError, DataError
from .registry import Registry

SPLITS = ("train", "test")
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian `dataset-fashion-mnist`
ENV_VAR = "RAYROBUST_DATA"

DATASETS: Registry[Callable[..., "ArrayDataset"]] = Registry("dataset")


@dataclass
class ArrayDataset:
    """One split held in memory. x: (N, C, H, W) float32 in [0,1]; y: (N,) int64 class ids."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    mean: Tuple[float, ...]  # per-channel training-set mean, [0,1] pixel scale
    std: Tuple[float, ...]  # per-channel training-set std, [0,1] pixel scale
    classes: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DataError(f"dataset {self.name}: expected x (N,C,H,W) and y (N,), "
                            f"got {tuple(self.x.shape)} and {tuple(self.y.shape)}")
        if self.x.dtype != torch.float32 or self.y.dtype != torch.int64:
            raise DataError(f"dataset {self.name}: expected float32 x and int64 y, "
                            f"got {self.x.dtype} and {self.y.dtype}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return (c, h, w)

    def subset(self, indices: Any) -> "ArrayDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)  # (M,)
        return dataclasses.replace(self, x=self.x[idx], y=self.y[idx])

    def take(self, n: int) -> "ArrayDataset":
        """The first n examples (all of them if n >= len)."""
        n = min(int(n), len(self))
        return dataclasses.replace(self, x=self.x[:n].clone(), y=self.y[:n].clone())


def load_dataset(name: str, split: str = "train", *, root: Optional[str] = None,
                 download: bool = False, limit: Optional[int] = None,
                 **options: Any) -> ArrayDataset:
    """Load one split of a registered dataset; `limit` keeps the first `limit` examples.

    `options` go to the loader (e.g. `image_size=64` for imagefolder).
    """
    loader = DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"dataset split {split!r} is not valid; use one of {', '.join(SPLITS)}")
    if limit is not None and (not isinstance(limit, Integral) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"data limit={limit!r} must be a positive integer or None")
    _check_options(name, loader, options)
    if "limit" in inspect.signature(loader).parameters:  # the loader reads only what it needs
        options = {**options, "limit": limit}
    ds = loader(split=split, root=root, download=download, **options)
    return ds.take(limit) if limit is not None else ds


def _check_options(name: str, loader: Callable[..., Any], options: dict) -> None:
    valid = [p for p in inspect.signature(loader).parameters if p not in ("split", "root", "download", "limit")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"dataset {name!r} has no option {', '.join(unknown)}; "
                          f"its options: {', '.join(valid) or '(none)'}")


def _data_root(root: Optional[str]) -> Path:
    """Where downloads go and CIFAR is looked up: `root`, else $RAYROBUST_DATA, else ./data."""
    return Path(root or os.environ.get(ENV_VAR) or "data").expanduser()


def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W) in [0,1]."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)  # (N, 1, H, W)
    return x.float().div_(255.0)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX gz files)
# ---------------------------------------------------------------------------------------------
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_COUNTS = {"train": 60000, "test": 10000}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped if the name ends in .gz) with `ndim` dims."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or corrupt, "
                        f"replace it") from None
    header = 4 + 4 * ndim  # magic (2 zero bytes, dtype, ndim) + one uint32 per dim
    if len(raw) < header:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != 0x0800 + ndim:  # 0x08 = unsigned byte data
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{0x0800 + ndim:08x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says shape {dims} ({expected} bytes) but the file has "
                        f"{len(raw) - header} data bytes; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def _fashion_candidates(root: Optional[str]) -> List[Path]:
    """Directories that may hold the IDX files, in search order."""
    dirs: List[Path] = []
    for base in (root, os.environ.get(ENV_VAR)):
        if base:
            base = Path(base).expanduser()
            dirs += [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    local = Path("data")
    dirs += [SYSTEM_FASHION_MNIST, local / "fashion-mnist", local / "FashionMNIST" / "raw"]
    return dirs


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _find_fashion(split: str, root: Optional[str]) -> Tuple[Optional[Tuple[Path, Path]], List[Path]]:
    """The (images, labels) files of the first directory holding both, and the dirs searched."""
    searched = _fashion_candidates(root)
    for d in searched:
        files = [_find_file(d, stem) for stem in FASHION_FILES[split]]
        if all(files):
            return (files[0], files[1]), searched
    return None, searched


def _download_fashion(split: str, root: Optional[str]) -> Tuple[Path, Path]:
    import torchvision

    base = _data_root(root)
    try:
        torchvision.datasets.FashionMNIST(str(base), train=(split == "train"), download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(f"downloading Fashion-MNIST to {base} failed: {e}") from None
    found, _ = _find_fashion(split, str(base))
    if found is None:
        raise DataError(f"Fashion-MNIST download to {base} left no IDX files in {base}/FashionMNIST/raw")
    return found


@DATASETS.register("fashion_mnist")
def fashion_mnist(*, split: str, root: Optional[str] = None, download: bool = False) -> ArrayDataset:
    found, searched = _find_fashion(split, root)
    if found is None and download:
        found = _download_fashion(split, root)
    if found is None:
        raise DataError(
            f"Fashion-MNIST not found (looked in: {', '.join(str(d) for d in searched)}). "
            f"Install it with `apt-get install dataset-fashion-mnist`, set {ENV_VAR}=/path/to/dir, "
            f"or pass data.download=true to download it"
        )
    images_path, labels_path = found
    images = read_idx(images_path, ndim=3)  # (N, 28, 28) uint8
    labels = read_idx(labels_path, ndim=1)  # (N,) uint8
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{images_path}: images {images.shape} do not match labels {labels.shape} "
                        f"in {labels_path} (expected (N, 28, 28) and (N,))")
    if labels.max(initial=0) >= 10:
        raise DataError(f"{labels_path}: label {labels.max()} out of range 0..9")
    return ArrayDataset(x=_to_float(images), y=torch.from_numpy(labels.astype(np.int64)),
                        num_classes=10, name="fashion_mnist", mean=(0.2860,), std=(0.3530,),
                        classes=list(FASHION_CLASSES))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches, the format torchvision downloads)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CifarSpec:
    name: str
    folder: str  # directory inside the data root
    files: dict  # split -> batch file names
    meta: str  # file with the class names
    label_key: str  # "labels" or "fine_labels"
    names_key: str  # "label_names" or "fine_label_names"
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    torchvision_class: str


CIFAR10 = CifarSpec("cifar10", "cifar-10-batches-py",
                    {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                    "batches.meta", "labels", "label_names", 10,
                    (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR10")
CIFAR100 = CifarSpec("cifar100", "cifar-100-python", {"train": ["train"], "test": ["test"]},
                     "meta", "fine_labels", "fine_label_names", 100,
                     (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR100")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR file can hold nothing that runs code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR files hold only arrays and lists")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """Load one CIFAR batch or meta file as a dict with str keys.

    The official files are Python 2 pickles whose keys load as bytes with encoding="bytes"
    (str keys, from files re-saved by Python 3, are accepted too). Only numpy arrays and plain
    containers are accepted (`_ArrayUnpickler`)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing; the CIFAR directory is incomplete, re-download it") from None
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError...
        raise DataError(f"{path}: cannot read CIFAR batch ({type(e).__name__}: {e}); the file is "
                        f"truncated or corrupt, re-download it") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in a CIFAR batch, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_cifar_batch(path: Path, spec: CifarSpec) -> Tuple[np.ndarray, np.ndarray]:
    """One batch -> images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    batch = _unpickle(path)
    if "data" not in batch or spec.label_key not in batch:
        raise DataError(f"{path}: not a {spec.name} batch (keys {sorted(batch)}; "
                        f"need 'data' and {spec.label_key!r})")
    data = np.asarray(batch["data"], dtype=np.uint8)  # (N, 3072), rows are R then G then B planes
    labels = np.asarray(batch[spec.label_key], dtype=np.int64)  # (N,)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: data {data.shape} / labels {labels.shape} are not (N, 3072) / (N,)")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{path}: labels outside 0..{spec.num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_dir(spec: CifarSpec, root: Optional[str]) -> Optional[Path]:
    base = _data_root(root)
    for d in (base / spec.folder, base):  # root may be the batch directory itself
        if (d / spec.meta).is_file():
            return d
    return None


def _load_cifar(spec: CifarSpec, split: str, root: Optional[str], download: bool) -> ArrayDataset:
    directory = _cifar_dir(spec, root)
    if directory is None and download:
        import torchvision

        base = _data_root(root)
        try:
            getattr(torchvision.datasets, spec.torchvision_class)(str(base), train=(split == "train"),
                                                                  download=True)
        except Exception as e:  # network errors come in many types
            raise DataError(f"downloading {spec.name} to {base} failed: {e}") from None
        directory = _cifar_dir(spec, root)
    if directory is None:
        raise DataError(
            f"{spec.name} not found: no {spec.folder}/{spec.meta} under {_data_root(root)}. "
            f"Pass data.download=true to download it, or place the `{spec.folder}` directory "
            f"(python version) under data.root or ${ENV_VAR}"
        )
    parts = [_read_cifar_batch(directory / f, spec) for f in spec.files[split]]
    images = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32) uint8
    labels = np.concatenate([p[1] for p in parts])  # (N,)
    meta = _unpickle(directory / spec.meta)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(spec.names_key, [])]
    if len(classes) != spec.num_classes:
        raise DataError(f"{directory / spec.meta}: has {len(classes)} class names, expected "
                        f"{spec.num_classes}")
    return ArrayDataset(x=_to_float(images), y=torch.from_numpy(labels), num_classes=spec.num_classes,
                        name=spec.name, mean=spec.mean, std=spec.std, classes=classes)


@DATASETS.register("cifar10")
def cifar10(*, split: str, root: Optional[str] = None, download: bool = False) -> ArrayDataset:
    return _load_cifar(CIFAR10, split, root, download)


@DATASETS.register("cifar100")
def cifar100(*, split: str, root: Optional[str] = None, download: bool = False) -> ArrayDataset:
    return _load_cifar(CIFAR100, split, root, download)


# ---------------------------------------------------------------------------------------------
# Image folders: root/<split>/<class>/*.png|jpg (e.g. ImageNet-10)
# ---------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # used for every image folder: they are mostly ImageNet subsets
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_crop(img: Any, size: int) -> np.ndarray:
    """An RGB PIL image -> short side resized to `size`, centre-cropped -> (3, size, size) uint8."""
    from PIL import Image

    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (3, size, size)


def _load_image(path: Path, size: int) -> np.ndarray:
    """Read as RGB, resize the short side to `size`, centre-crop -> (3, size, size) uint8."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return resize_crop(img.convert("RGB"), size)
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def _class_names(root: Path, split: str) -> List[str]:
    """Class folders of the train split (so test labels match), else of this split."""
    ref = root / "train" if (root / "train").is_dir() else root / split
    return sorted(d.name for d in ref.iterdir() if d.is_dir())


@DATASETS.register("imagefolder")
def imagefolder(*, split: str, root: Optional[str] = None, download: bool = False,
                image_size: int = 32) -> ArrayDataset:
    if root is None:
        raise DataError("imagefolder needs data.root=/path/to/dir holding <split>/<class>/*.png|jpg")
    if image_size < 1:
        raise ConfigError(f"imagefolder image_size={image_size} must be a positive pixel count")
    base = Path(root).expanduser()
    split_dir = base / split
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} not found; expected {base}/{split}/<class>/*.png|jpg")
    classes = _class_names(base, split)
    images, labels = [], []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if d.name not in classes:
            raise DataError(f"{d}: class {d.name!r} is not among the train classes {classes}")
        for f in sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            images.append(_load_image(f, image_size))
            labels.append(classes.index(d.name))
    if not images:
        raise DataError(f"image folder {split_dir} has no .png/.jpg images in class subdirectories")
    return ArrayDataset(x=_to_float(np.stack(images)), y=torch.tensor(labels, dtype=torch.int64),
                        num_classes=len(classes), name="imagefolder", mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, classes=classes)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits: 8x8, bundled, for tiny unit tests
# ---------------------------------------------------------------------------------------------
DIGITS_SEED = 0  # fixed: the 80/20 split must be the same on every machine
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_COUNT = 1797


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled digits file, read without importing scikit-learn (seconds in every worker)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits dataset ships with scikit-learn; install it (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    return np.loadtxt(path, delimiter=",")


@DATASETS.register("digits")
def digits(*, split: str, root: Optional[str] = None, download: bool = False) -> ArrayDataset:
    table = _digits_table()  # (1797, 65): 64 grey levels 0..16, then the label
    images = table[:, :64].reshape(-1, 8, 8).astype(np.float32) / 16.0  # (1797, 8, 8) in [0,1]
    labels = table[:, 64].astype(np.int64)
    order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
    n_train = int(DIGITS_TRAIN_FRACTION * len(images))  # 1437 train, 360 test
    idx = order[:n_train] if split == "train" else order[n_train:]
    x = torch.from_numpy(images[idx]).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(labels[idx])  # (N,)
    return ArrayDataset(x=x, y=y, num_classes=10, name="digits", mean=(0.3054,), std=(0.3760,),
                        classes=[str(i) for i in range(10)])


# ---------------------------------------------------------------------------------------------
# Parquet image datasets: <root>/meta.json + <root>/<split>/*.parquet, local or on object storage
# (docs/data.md). `rayrobust export-data` writes them; `rayrobust.data_ray` streams them on Ray.
# ---------------------------------------------------------------------------------------------
PARQUET_FORMAT = "rayrobust-images-v1"
PARQUET_META = "meta.json"
PARQUET_COLUMNS = ("index", "label", "image")


def read_image_meta(root: Optional[str]) -> Dict[str, Any]:
    """The validated meta.json of a Parquet image dataset at `root` (a local path or URI)."""
    from .location import Location

    if not root:
        raise DataError("data.name=parquet needs data.root=<directory or URI holding meta.json and <split>/*.parquet>")
    loc = Location(root) / PARQUET_META
    try:
        text = loc.read_text()
    except FileNotFoundError:
        raise DataError(f"{loc.uri} not found: a Parquet image dataset is <root>/meta.json plus <root>/<split>/*.parquet "
                        f"(docs/data.md); write one with `rayrobust export-data`") from None
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise DataError(f"{loc.uri}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{loc.uri}: expected a JSON object")
    missing = [k for k in ("shape", "num_classes", "mean", "std", "counts") if k not in meta]
    if missing:
        raise DataError(f"{loc.uri}: missing {', '.join(missing)} (required: shape, num_classes, mean, std, counts)")
    shape = meta["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise DataError(f"{loc.uri}: shape={shape!r} must be [C, H, W] positive integers")
    channels = shape[0]
    for key in ("mean", "std"):
        if not (isinstance(meta[key], list) and len(meta[key]) == channels):
            raise DataError(f"{loc.uri}: {key}={meta[key]!r} must list one number per channel ({channels})")
    if not (isinstance(meta["num_classes"], int) and meta["num_classes"] >= 1):
        raise DataError(f"{loc.uri}: num_classes={meta['num_classes']!r} must be a positive integer")
    counts = meta["counts"]
    if not (isinstance(counts, dict) and all(isinstance(counts.get(s, 0), int) and counts.get(s, 0) >= 0 for s in SPLITS)):
        raise DataError(f"{loc.uri}: counts={counts!r} must map train/test to row counts")
    scale = meta.get("scale", 255)
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise DataError(f"{loc.uri}: scale={scale!r} must be > 0 (pixel value in [0,1] = byte / scale)")
    return meta


def image_meta_files(meta: Dict[str, Any], root: str, split: str, limit: Optional[int] = None) -> List[Any]:
    """The Parquet files of `split` (Locations) that hold indices below `limit`: meta.json's `files` list
    when it has one (an export's own files, nothing else in the directory), else every *.parquet in <root>/<split>/."""
    from .location import Location

    base = Location(root)
    listed = (meta.get("files") or {}).get(split)
    if listed is not None:
        return [base / f["file"] for f in listed
                if limit is None or "start" not in f or int(f["start"]) < limit]
    return [f for f in (base / split).iterdir() if f.name.endswith(".parquet")]


def decode_images(column: Any, shape: Tuple[int, ...]) -> np.ndarray:
    """An Arrow binary column of raw uint8 C*H*W images -> (N, C, H, W) uint8 (a read-only view)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n, width = len(column), int(np.prod(shape))
    if n == 0:
        return np.zeros((0, *shape), np.uint8)
    if column.null_count:
        raise DataError("Parquet image column holds nulls; every row needs C*H*W image bytes")
    kind = column.type
    if pa.types.is_fixed_size_binary(kind):
        if kind.byte_width != width:
            raise DataError(f"Parquet images have {kind.byte_width} bytes, expected C*H*W = {width} for shape {list(shape)}")
        data = np.frombuffer(column.buffers()[1], np.uint8)[column.offset * width:(column.offset + n) * width]
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        offsets = np.frombuffer(column.buffers()[1], np.int64 if pa.types.is_large_binary(kind) else np.int32)
        offsets = offsets[column.offset:column.offset + n + 1]
        sizes = np.diff(offsets)
        if np.any(sizes != width):
            bad = int(np.flatnonzero(sizes != width)[0])
            raise DataError(f"Parquet image row {bad} has {int(sizes[bad])} bytes, expected C*H*W = {width} "
                            f"for shape {list(shape)}")
        data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[0] + n * width]
    else:
        raise DataError(f"Parquet image column has type {kind}; expected binary (raw uint8 C*H*W bytes)")
    return data.reshape(n, *shape)


def encode_images(images: np.ndarray) -> Any:
    """(N, C, H, W) uint8 -> an Arrow binary array, one raw C*H*W byte string per image (no per-row copy)."""
    import pyarrow as pa

    flat = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)  # (N, C*H*W)
    n, width = flat.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32) if n * width < 2 ** 31 else None
    if offsets is None:
        raise DataError(f"{n} images of {width} bytes exceed one Parquet chunk; write fewer rows per file")
    return pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat)])


@DATASETS.register("parquet")
def parquet(*, split: str, root: Optional[str] = None, download: bool = False,
            limit: Optional[int] = None) -> ArrayDataset:
    """A Parquet image dataset read whole into memory (evaluation's test images; streaming training
    reads it on Ray workers instead, `rayrobust.data_ray.image_dataset`)."""
    import pyarrow.parquet as pq

    meta = read_image_meta(root)
    shape = tuple(meta["shape"])
    images, labels, index = [], [], []
    for f in image_meta_files(meta, root, split, limit):
        try:
            with f.open_input() as handle:
                table = pq.read_table(handle, columns=list(PARQUET_COLUMNS))
        except (KeyError, OSError, ValueError) as e:  # missing column, truncated file
            raise DataError(f"{f.uri}: cannot read Parquet images ({str(e).splitlines()[0]})") from None
        idx = table.column("index").to_numpy()
        keep = idx < limit if limit is not None else np.ones(len(idx), bool)
        index.append(idx[keep])
        labels.append(table.column("label").to_numpy()[keep])
        images.append(decode_images(table.column("image"), shape)[keep])
    if not index or not sum(len(i) for i in index):
        raise DataError(f"{root}: split {split!r} holds no rows")
    order = np.argsort(np.concatenate(index), kind="stable")
    x = torch.from_numpy(np.concatenate(images)[order]).float().div_(float(meta.get("scale", 255)))
    y = torch.from_numpy(np.concatenate(labels)[order].astype(np.int64))
    if int(y.max()) >= meta["num_classes"] or int(y.min()) < 0:
        raise DataError(f"{root}: split {split!r} has labels outside 0..{meta['num_classes'] - 1}")
    return ArrayDataset(x=x.contiguous(), y=y, num_classes=int(meta["num_classes"]), name=str(meta.get("name", "parquet")),
                        mean=tuple(meta["mean"]), std=tuple(meta["std"]), classes=list(meta.get("classes") or []))


# ---------------------------------------------------------------------------------------------
# Metadata without images: what the driver needs (shape, classes, statistics, split sizes)
# ---------------------------------------------------------------------------------------------
def imagefolder_listing(root: str, split: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(classes, [(relative path "<class>/<file>", label), ...]) of an image folder (local path or URI),
    in the order `imagefolder` loads it: classes sorted, files sorted within a class. Lists names only."""
    from .location import Location

    base = Location(root)
    ref = base / "train" if (base / "train").is_dir() else base / split
    classes = sorted(d.name for d in ref.iterdir() if d.is_dir())
    rows: List[Tuple[str, int]] = []
    for rel, _ in (base / split).files():
        parts = rel.split("/")
        if len(parts) != 2 or Path(parts[1]).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if parts[0] not in classes:
            raise DataError(f"{(base / split / parts[0]).uri}: class {parts[0]!r} is not among the train classes {classes}")
        rows.append((rel, classes.index(parts[0])))
    rows.sort(key=lambda r: tuple(r[0].split("/")))
    return classes, rows


def describe_dataset(name: str, *, root: Optional[str] = None, download: bool = False,
                     **options: Any) -> Dict[str, Any]:
    """Shape, classes, statistics and split sizes of a dataset without loading its images:
    {"shape": (C,H,W), "num_classes", "classes", "mean", "std", "scale", "counts": {"train", "test"}}.
    Pixel values in [0,1] are uint8 bytes / `scale` (255; 16 for digits' 17 grey levels)."""
    DATASETS.get(name)  # unknown name -> the registry's error
    if name == "digits":
        n_train = int(DIGITS_TRAIN_FRACTION * DIGITS_COUNT)
        return {"shape": (1, 8, 8), "num_classes": 10, "classes": [str(i) for i in range(10)], "mean": (0.3054,),
                "std": (0.3760,), "scale": 16, "counts": {"train": n_train, "test": DIGITS_COUNT - n_train}}
    if name == "fashion_mnist":
        counts = {}
        for split in SPLITS:
            found, searched = _find_fashion(split, root)
            if found is None and not download:
                fashion_mnist(split=split, root=root)  # raises the DataError that says where it looked
            counts[split] = _idx_count(found[1]) if found is not None else FASHION_COUNTS[split]
        return {"shape": (1, 28, 28), "num_classes": 10, "classes": list(FASHION_CLASSES), "mean": (0.2860,),
                "std": (0.3530,), "scale": 255, "counts": counts}
    if name in ("cifar10", "cifar100"):
        spec = CIFAR10 if name == "cifar10" else CIFAR100
        if _cifar_dir(spec, root) is None and not download:
            _load_cifar(spec, "train", root, download=False)  # raises the DataError with the fix
        return {"shape": (3, 32, 32), "num_classes": spec.num_classes, "classes": [], "mean": spec.mean,
                "std": spec.std, "scale": 255, "counts": {"train": 50000, "test": 10000}}
    if name == "imagefolder":
        if root is None:
            raise DataError("imagefolder needs data.root=/path/to/dir holding <split>/<class>/*.png|jpg")
        size = int(options.get("image_size", 32))
        counts, classes = {}, []
        for split in SPLITS:
            classes, rows = imagefolder_listing(root, split)
            counts[split] = len(rows)
        if not classes:
            raise DataError(f"image folder {root} has no class directories; expected {root}/<split>/<class>/*.png|jpg")
        return {"shape": (3, size, size), "num_classes": len(classes), "classes": classes, "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD, "scale": 255, "counts": counts}
    if name == "parquet":
        meta = read_image_meta(root)
        return {"shape": tuple(meta["shape"]), "num_classes": int(meta["num_classes"]),
                "classes": list(meta.get("classes") or []), "mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
                "scale": meta.get("scale", 255), "counts": {s: int(meta["counts"].get(s, 0)) for s in SPLITS}}
    # A dataset registered elsewhere: one small load tells its shape; its size needs a full load.
    sample = load_dataset(name, "train", root=root, download=download, limit=1, **options)
    return {"shape": sample.shape, "num_classes": sample.num_classes, "classes": sample.classes, "mean": sample.mean,
            "std": sample.std, "scale": None, "counts": None}


def _idx_count(path: Path) -> int:
    """The item count in an IDX file's header (reads 8 bytes)."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(8)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or corrupt, replace it") from None
    if len(head) < 8:
        raise DataError(f"{path}: too short for an IDX header")
    return int(struct.unpack(">I", head[4:8])[0])
