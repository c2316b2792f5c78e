"""Dataset loaders: the real Fashion-MNIST from the system package, and tiny files in the real
formats (IDX, CIFAR pickles, PNG folders) written by the tests. No Ray."""
from __future__ import annotations

import gzip
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rayrobust import data
from rayrobust.data import ArrayDataset, DATASETS, load_dataset
from rayrobust.errors import ConfigError, DataError

SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No $RAYROBUST_DATA and an empty working directory, so ./data is never picked up."""
    monkeypatch.delenv("RAYROBUST_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def fashion_test() -> ArrayDataset:
    return load_dataset("fashion_mnist", "test")


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    """Write uint8 `array` as an IDX file: magic 0x0000_08_<ndim>, big-endian dims, raw bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_fashion(directory: Path, n: int = 5, split: str = "t10k") -> tuple:
    """A tiny valid Fashion-MNIST split; image i is filled with the value 10*i, label i % 10."""
    directory.mkdir(parents=True, exist_ok=True)
    images = np.stack([np.full((28, 28), 10 * i, np.uint8) for i in range(n)])  # (n, 28, 28)
    labels = (np.arange(n) % 10).astype(np.uint8)  # (n,)
    write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
    write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return images, labels


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------
def test_fashion_mnist_train_from_system_package():
    ds = load_dataset("fashion_mnist", "train")
    assert len(ds) == 60000 and ds.shape == (1, 28, 28) and ds.x.shape == (60000, 1, 28, 28)
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.num_classes == 10 and len(ds.classes) == 10 and ds.classes[9] == "Ankle boot"
    assert torch.bincount(ds.y).tolist() == [6000] * 10
    # the mean/std constants are this split's statistics
    assert abs(ds.x.mean().item() - ds.mean[0]) < 1e-3 and abs(ds.x.std().item() - ds.std[0]) < 1e-3


def test_fashion_mnist_test_split(fashion_test):
    assert len(fashion_test) == 10000
    assert torch.bincount(fashion_test.y).tolist() == [1000] * 10
    assert fashion_test.y[:5].tolist() == [9, 2, 1, 1, 6]  # the published first test labels
    assert 0.0 <= fashion_test.x.min() and fashion_test.x.max() <= 1.0


def test_limit_keeps_the_first_examples(fashion_test):
    small = load_dataset("fashion_mnist", "test", limit=100)
    assert len(small) == 100
    assert torch.equal(small.x, fashion_test.x[:100]) and torch.equal(small.y, fashion_test.y[:100])


@pytest.mark.parametrize("layout", ["dir_itself", "fashion-mnist_subdir"])
def test_rayrobust_data_env_var(monkeypatch, tmp_path, layout):
    env_dir = tmp_path / "store"
    target = env_dir if layout == "dir_itself" else env_dir / "fashion-mnist"
    images, labels = write_fashion(target, n=5)
    monkeypatch.setenv("RAYROBUST_DATA", str(env_dir))
    ds = load_dataset("fashion_mnist", "test")  # env comes before the system directory
    assert len(ds) == 5
    assert ds.y.tolist() == labels.tolist()
    torch.testing.assert_close(ds.x[:, 0, 3, 3], torch.tensor([10.0 * i / 255 for i in range(5)]))


def test_root_argument_comes_first(monkeypatch, tmp_path):
    write_fashion(tmp_path / "env", n=5)
    write_fashion(tmp_path / "root", n=3)
    monkeypatch.setenv("RAYROBUST_DATA", str(tmp_path / "env"))
    assert len(load_dataset("fashion_mnist", "test", root=str(tmp_path / "root"))) == 3


def test_copied_system_files_load_identically(monkeypatch, tmp_path, fashion_test):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(SYSTEM / name, tmp_path / name)
    monkeypatch.setenv("RAYROBUST_DATA", str(tmp_path))
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "absent")
    ds = load_dataset("fashion_mnist", "test")
    assert torch.equal(ds.x, fashion_test.x) and torch.equal(ds.y, fashion_test.y)


def test_truncated_gzip_names_the_file(monkeypatch, tmp_path):
    shutil.copy(SYSTEM / "t10k-labels-idx1-ubyte.gz", tmp_path)
    raw = (SYSTEM / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    monkeypatch.setenv("RAYROBUST_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*truncated or corrupt"):
        load_dataset("fashion_mnist", "test")


def test_idx_payload_shorter_than_header_says(monkeypatch, tmp_path):
    write_fashion(tmp_path, n=5)
    labels_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    payload = gzip.decompress(labels_path.read_bytes())
    labels_path.write_bytes(gzip.compress(payload[:-2]))  # valid gzip, 2 labels missing
    monkeypatch.setenv("RAYROBUST_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*\(5,\).*3 data bytes"):
        load_dataset("fashion_mnist", "test")


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(struct.pack(">II", 0x0D03, 1) + b"\0"))  # float dtype 0x0D
    with pytest.raises(DataError, match=r"x\.gz: bad IDX magic number 0x00000d03"):
        data.read_idx(path, ndim=1)


def test_idx_uncompressed_files_are_read(tmp_path):
    write_idx(tmp_path / "labels", np.array([3, 1, 4], np.uint8), compress=False)
    assert data.read_idx(tmp_path / "labels", ndim=1).tolist() == [3, 1, 4]


def test_missing_fashion_mnist_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "no-package")
    monkeypatch.setenv("RAYROBUST_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", "train")
    message = str(err.value)
    assert "Fashion-MNIST not found" in message and str(tmp_path / "no-package") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "RAYROBUST_DATA" in message and "data.download=true" in message


# ---------------------------------------------------------------------------------------------
# load_dataset arguments
# ---------------------------------------------------------------------------------------------
def test_registry_and_argument_errors():
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "parquet"]
    with pytest.raises(ConfigError, match=r"'mnist'.*cifar10.*fashion_mnist"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match=r"'val'.*train, test"):
        load_dataset("digits", "val")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="limit"):
            load_dataset("digits", limit=bad)
    with pytest.raises(ConfigError, match=r"no option image_size"):
        load_dataset("digits", image_size=16)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: tiny pickles in the format torchvision downloads
# ---------------------------------------------------------------------------------------------
def cifar_rows(n: int, start: int) -> np.ndarray:
    """n flat images (n, 3072): image i has R=start+i, G=100+start+i, B=200+start+i everywhere."""
    values = np.arange(start, start + n)[:, None]  # (n, 1)
    planes = [np.repeat(values + offset, 1024, axis=1) for offset in (0, 100, 200)]
    return np.concatenate(planes, axis=1).astype(np.uint8)  # (n, 3072)


class Py2Str(bytes):
    """A Python 2 `str`. The official CIFAR files are Python 2 pickles: their keys and class
    names load as bytes with encoding="bytes" and as str with encoding="latin1"."""


class Py2Pickler(pickle._Pickler):
    """Pickles `Py2Str` with the (SHORT_)BINSTRING opcodes Python 2 used for `str`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj: Py2Str) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + bytes(obj))
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def py2(obj):
    """Turn the str keys/values of a (nested) dict or list into Python 2 strs."""
    if isinstance(obj, str):
        return Py2Str(obj.encode("latin1"))
    if isinstance(obj, dict):
        return {py2(k): py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [py2(v) for v in obj]
    return obj


def dump(path: Path, obj: dict) -> None:
    """Write `obj` as the official files are written: a protocol-2 Python 2 pickle."""
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(py2(obj))


def write_cifar10(root: Path) -> Path:
    """5 train batches of 2 images (labels 0..9 in order) and a test batch of 3 images."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for b in range(5):
        dump(d / f"data_batch_{b + 1}", {"batch_label": "training batch", "data": cifar_rows(2, 2 * b),
                                         "labels": [2 * b, 2 * b + 1], "filenames": ["a", "b"]})
    dump(d / "test_batch", {"data": cifar_rows(3, 50), "labels": [7, 8, 9]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump(d / "batches.meta", {"label_names": names, "num_cases_per_batch": 2, "num_vis": 3072})
    return d


def test_cifar10_tiny_files(tmp_path):
    write_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    test = load_dataset("cifar10", "test", root=str(tmp_path))
    assert len(train) == 10 and len(test) == 3 and train.shape == (3, 32, 32)
    assert train.y.tolist() == list(range(10)) and test.y.tolist() == [7, 8, 9]
    assert train.num_classes == 10 and train.classes[3] == "cat"
    assert train.mean == (0.4914, 0.4822, 0.4465)
    # image 4 is in batch 3: R plane = 4, G = 104, B = 204 (channel-major rows)
    torch.testing.assert_close(train.x[4, :, 5, 7], torch.tensor([4.0, 104.0, 204.0]) / 255)
    torch.testing.assert_close(test.x[0, :, 31, 0], torch.tensor([50.0, 150.0, 250.0]) / 255)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_reader_matches_torchvision(monkeypatch, tmp_path, split):
    """Our reader and torchvision's agree on the same files (its md5 check disabled for them)."""
    import torchvision

    write_cifar10(tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    reference = torchvision.datasets.CIFAR10(str(tmp_path), train=(split == "train"))
    ours = load_dataset("cifar10", split, root=str(tmp_path))
    expected = torch.from_numpy(reference.data).permute(0, 3, 1, 2).float() / 255  # HWC -> CHW
    assert torch.equal(ours.x, expected)
    assert ours.y.tolist() == reference.targets and ours.classes == reference.classes


def test_cifar_files_resaved_by_python3_load_too(tmp_path):
    d = write_cifar10(tmp_path)
    with open(d / "test_batch", "wb") as f:  # str keys, protocol 5
        pickle.dump({"data": cifar_rows(1, 9), "labels": [4]}, f)
    with open(d / "test_batch", "rb") as f:
        assert "data" in pickle.load(f, encoding="bytes")
    assert load_dataset("cifar10", "test", root=str(tmp_path)).y.tolist() == [4]


def test_cifar_root_may_be_the_batch_dir_or_env(monkeypatch, tmp_path):
    batch_dir = write_cifar10(tmp_path)
    assert len(load_dataset("cifar10", "test", root=str(batch_dir))) == 3
    monkeypatch.setenv("RAYROBUST_DATA", str(tmp_path))
    assert len(load_dataset("cifar10", "test", limit=2)) == 2


def test_cifar100_tiny_files(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    dump(d / "train", {"data": cifar_rows(4, 0), "fine_labels": [0, 42, 99, 5],
                       "coarse_labels": [0, 1, 2, 3]})
    dump(d / "test", {"data": cifar_rows(2, 9), "fine_labels": [98, 1], "coarse_labels": [0, 0]})
    dump(d / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                      "coarse_label_names": [f"s{i}" for i in range(20)]})
    train = load_dataset("cifar100", "train", root=str(tmp_path))
    assert train.y.tolist() == [0, 42, 99, 5] and train.num_classes == 100
    assert train.classes[42] == "c42" and train.x.shape == (4, 3, 32, 32)
    assert load_dataset("cifar100", "test", root=str(tmp_path)).y.tolist() == [98, 1]


def test_missing_cifar_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"cifar10 not found.*data.download=true.*cifar-10-batches-py"):
        load_dataset("cifar10", root=str(tmp_path))


def test_truncated_cifar_batch_names_the_file(tmp_path):
    d = write_cifar10(tmp_path)
    raw = (d / "data_batch_3").read_bytes()
    (d / "data_batch_3").write_bytes(raw[:1000])
    with pytest.raises(DataError, match=r"data_batch_3.*truncated or corrupt"):
        load_dataset("cifar10", root=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------
def write_png(path: Path, color, size=(40, 20), mode="RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_imagefolder_reads_resizes_and_labels(tmp_path):
    for i in range(2):
        write_png(tmp_path / "train" / "cat" / f"{i}.png", (255, 0, 0))
    write_png(tmp_path / "train" / "dog" / "0.png", 128, mode="L")  # grey: converted to RGB
    write_png(tmp_path / "test" / "dog" / "0.png", (0, 0, 255), size=(16, 64))
    train = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=16)
    assert train.x.shape == (3, 3, 16, 16) and train.classes == ["cat", "dog"]
    assert train.y.tolist() == [0, 0, 1] and train.num_classes == 2
    torch.testing.assert_close(train.x[0, :, 8, 8], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(train.x[2, :, 0, 0], torch.full((3,), 128 / 255))
    test = load_dataset("imagefolder", "test", root=str(tmp_path))  # default image_size 32
    assert test.x.shape == (1, 3, 32, 32)
    assert test.y.tolist() == [1]  # labelled by the train split's classes, not its own
    torch.testing.assert_close(test.x[0, :, 31, 31], torch.tensor([0.0, 0.0, 1.0]))


def test_imagefolder_missing_dir(tmp_path):
    with pytest.raises(DataError, match=r"image folder .*test not found"):
        load_dataset("imagefolder", "test", root=str(tmp_path))
    with pytest.raises(DataError, match="data.root"):
        load_dataset("imagefolder", "train")


# ---------------------------------------------------------------------------------------------
# scikit-learn digits and ArrayDataset
# ---------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_and_disjoint():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.shape == (1, 8, 8) and train.num_classes == 10
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert abs(train.x.mean().item() - train.mean[0]) < 1e-3
    again = load_dataset("digits", "train")
    assert torch.equal(again.x, train.x) and torch.equal(again.y, train.y)
    # together the two splits hold every image exactly once
    from sklearn.datasets import load_digits

    all_images = torch.from_numpy(load_digits().images.astype(np.float32) / 16).flatten(1)
    both = torch.cat([train.x, test.x]).flatten(1)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(both) == key(all_images)


def test_array_dataset_subset_take_and_validation():
    ds = ArrayDataset(x=torch.arange(5.0).view(5, 1, 1, 1), y=torch.arange(5), num_classes=5,
                      name="toy", mean=(0.5,), std=(0.5,))
    sub = ds.subset([4, 0])
    assert sub.y.tolist() == [4, 0] and sub.x.flatten().tolist() == [4.0, 0.0]
    assert sub.name == "toy" and sub.mean == (0.5,)
    assert ds.take(2).y.tolist() == [0, 1] and len(ds.take(99)) == 5
    assert ds.shape == (1, 1, 1) and len(ds) == 5
    with pytest.raises(DataError, match="toy"):
        ArrayDataset(x=torch.zeros(3, 1, 2, 2), y=torch.zeros(2, dtype=torch.int64),
                     num_classes=2, name="toy", mean=(0.5,), std=(0.5,))


class _CodePayload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {os.environ['RR_CIFAR_PWNED']}",))


def test_cifar_file_carrying_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    import pickle

    marker = tmp_path / "pwned"
    monkeypatch.setenv("RR_CIFAR_PWNED", str(marker))
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        (d / name).write_bytes(pickle.dumps({"data": _CodePayload()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", "test", root=str(tmp_path))
    assert not marker.exists()
