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
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from numbers import Integral
from typing import Any, Callable, List, Optional, Tuple

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
    ds = loader(split=split, root=root, download=download, **options)
    return ds.take(limit) if limit is not None else ds


def _check_options(name: str, loader: Callable[..., Any], options: dict) -> None:
    valid = [p for p in inspect.signature(loader).parameters if p not in ("split", "root", "download")]
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


def _load_image(path: Path, size: int) -> np.ndarray:
    """Read as RGB, resize the short side to `size`, centre-crop -> (3, size, size) uint8."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = size / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            img = img.resize((w, h), Image.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # (3, size, size)
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


@DATASETS.register("digits")
def digits(*, split: str, root: Optional[str] = None, download: bool = False) -> ArrayDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # (1797, 8, 8), grey levels 0..16 -> [0,1]
    order = np.random.default_rng(DIGITS_SEED).permutation(len(images))
    n_train = int(DIGITS_TRAIN_FRACTION * len(images))  # 1437 train, 360 test
    idx = order[:n_train] if split == "train" else order[n_train:]
    x = torch.from_numpy(images[idx]).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(bunch.target[idx].astype(np.int64))  # (N,)
    return ArrayDataset(x=x, y=y, num_classes=10, name="digits", mean=(0.3054,), std=(0.3760,),
                        classes=[str(i) for i in range(10)])
