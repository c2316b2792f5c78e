"""Datasets streamed by Ray Data (rayrobust.data_ray): packaged, Parquet on S3, image folders on S3."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from rayrobust.config import DataConfig
from rayrobust.data import decode_images, encode_images, load_dataset
from rayrobust.errors import ConfigError, DataError


def collect(ds):
    """Every row of a Ray Dataset as (index, label, image) numpy arrays sorted by index."""
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index)
    label = np.concatenate([p["label"] for p in parts])
    image = np.concatenate([p["image"] for p in parts])
    return index[order], label[order], image[order]


def test_image_bytes_roundtrip_and_errors():
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    column = encode_images(images)
    assert np.array_equal(decode_images(column, (3, 4, 4)), images)
    assert np.array_equal(decode_images(column.slice(2, 2), (3, 4, 4)), images[2:4])
    with pytest.raises(DataError, match="48 bytes, expected C\\*H\\*W = 16"):
        decode_images(column, (1, 4, 4))


def test_parquet_config_needs_a_root_and_a_valid_uri():
    with pytest.raises(ConfigError, match="data.name=parquet needs data.root"):
        DataConfig(name="parquet")
    with pytest.raises(ConfigError, match="only data.name=parquet or imagefolder"):
        DataConfig(name="digits", root="s3://some-bucket/digits")
    assert DataConfig(name="parquet", root="s3://some-bucket/digits").streamed
    assert not DataConfig(name="digits").streamed and DataConfig(name="digits", stream=True).streamed


def test_missing_meta_json_is_one_line(s3_server, tmp_path):
    from rayrobust.data_ray import dataset_info

    bucket = s3_server.make_bucket("rr-stream-missing")
    for root in (f"{bucket}/nothing-here", str(tmp_path)):
        with pytest.raises(DataError) as err:
            dataset_info(DataConfig(name="parquet", root=root))
        assert "meta.json not found" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "meta.json").write_text(json.dumps({"shape": [1, 8, 8]}))
    with pytest.raises(DataError, match="missing num_classes, mean, std, counts"):
        load_dataset("parquet", "train", root=str(tmp_path))


@pytest.mark.ray
def test_digits_stream_matches_load_dataset(ray_cluster):
    from rayrobust.data_ray import dataset_info, image_dataset

    cfg = DataConfig(name="digits")
    info = dataset_info(cfg)
    assert info["shape"] == (1, 8, 8) and (info["n_train"], info["n_test"]) == (1437, 360) and info["scale"] == 16
    for split in ("train", "test"):
        ref = load_dataset("digits", split)
        index, label, image = collect(image_dataset(cfg, split))
        assert image.dtype == np.uint8 and image.shape == tuple(ref.x.shape)
        assert np.array_equal(index, np.arange(len(ref)))
        assert np.array_equal(label, ref.y.numpy())
        assert torch.equal(torch.from_numpy(image).float() / info["scale"], ref.x)  # exact
    index, _, _ = collect(image_dataset(cfg, "train", limit=300, exclude=[0, 5, 299, 300]))
    assert np.array_equal(index, np.setdiff1d(np.arange(300), [0, 5, 299]))
    index, _, _ = collect(image_dataset(cfg, "train", indices=[7, 3, 1000]))
    assert index.tolist() == [3, 7, 1000]


@pytest.mark.ray
def test_export_parquet_to_s3_and_stream_it_back(ray_cluster, s3_server):
    from rayrobust.cli import main
    from rayrobust.data_ray import dataset_info, export_parquet, image_dataset

    out = s3_server.make_bucket("rr-stream-export") + "/digits"
    meta = export_parquet(DataConfig(name="digits"), out, rows_per_file=500)
    keys = [k for k in s3_server.keys("rr-stream-export") if not k.endswith("/")]  # no directory markers
    assert keys == ["digits/meta.json", "digits/test/part-00000.parquet", "digits/train/part-00000.parquet",
                    "digits/train/part-00001.parquet", "digits/train/part-00002.parquet"]
    assert meta["counts"] == {"train": 1437, "test": 360} and meta["scale"] == 16
    cfg = DataConfig(name="parquet", root=out)
    info = dataset_info(cfg)
    assert (info["shape"], info["num_classes"], info["n_train"]) == ((1, 8, 8), 10, 1437)
    for split in ("train", "test"):
        ref = load_dataset("digits", split)
        index, label, image = collect(image_dataset(cfg, split))
        assert np.array_equal(index, np.arange(len(ref))) and np.array_equal(label, ref.y.numpy())
        assert torch.equal(torch.from_numpy(image).float() / info["scale"], ref.x)
        assert torch.equal(load_dataset("parquet", split, root=out).x, ref.x)  # the in-memory loader agrees
    index, _, _ = collect(image_dataset(cfg, "train", limit=600))  # reads two of the three files
    assert np.array_equal(index, np.arange(600))
    assert torch.equal(load_dataset("parquet", "train", root=out, limit=600).x, load_dataset("digits", limit=600).x)

    with pytest.raises(DataError, match="already holds an exported dataset") as err:
        export_parquet(DataConfig(name="digits"), out)
    assert "\n" not in str(err.value)
    assert main(["export-data", "--set", "data.name=digits", "--out", out]) == 2  # one line, status 2
    export_parquet(DataConfig(name="digits", train_limit=100), out, overwrite=True, rows_per_file=1000)
    assert dataset_info(cfg)["n_train"] == 100
    assert [k for k in s3_server.keys("rr-stream-export", "digits/train/") if not k.endswith("/")] == [
        "digits/train/part-00000.parquet"]  # the old export's files are gone


def _png(rng, height: int, width: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.ray
def test_imagefolder_on_s3_matches_the_local_loader(ray_cluster, s3_server, tmp_path):
    from rayrobust.data_ray import dataset_info, image_dataset
    from rayrobust.location import Location

    rng = np.random.default_rng(0)
    root = s3_server.make_bucket("rr-stream-folder") + "/imgs"
    files = {"train/cat/a.png": (20, 30), "train/cat/b.png": (16, 16), "train/dog/c.png": (40, 24),
             "train/dog/d.png": (17, 33), "train/dog/e.png": (12, 12), "test/cat/f.png": (18, 18),
             "test/dog/g.png": (25, 21)}
    for rel, (h, w) in files.items():
        data = _png(rng, h, w)
        (Location(root) / rel).write_bytes(data)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    cfg = DataConfig(name="imagefolder", root=root)
    info = dataset_info(cfg)
    assert info["shape"] == (3, 32, 32) and info["classes"] == ["cat", "dog"]
    assert (info["n_train"], info["n_test"]) == (5, 2)
    for split in ("train", "test"):
        ref = load_dataset("imagefolder", split, root=str(tmp_path))
        index, label, image = collect(image_dataset(cfg, split))
        assert np.array_equal(index, np.arange(len(ref))) and np.array_equal(label, ref.y.numpy())
        assert torch.equal(torch.from_numpy(image).float() / 255.0, ref.x)
        # the same folder on a local path goes through the packaged loader on a worker
        _, _, local = collect(image_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split))
        assert np.array_equal(local, image)
    index, label, _ = collect(image_dataset(cfg, "train", limit=3))
    assert index.tolist() == [0, 1, 2] and label.tolist() == [0, 0, 1]


@pytest.fixture(scope="module")
def digits_on_s3(ray_cluster, s3_server):
    """The digits dataset exported as Parquet to the S3 server (three train files, one test file)."""
    from rayrobust.data_ray import export_parquet

    out = s3_server.make_bucket("rr-stream-train") + "/digits"
    export_parquet(DataConfig(name="digits"), out, rows_per_file=500)
    return out


@pytest.mark.ray
def test_streamed_training_on_s3_parquet_replays_on_resume(ray_cluster, digits_on_s3, tmp_path):
    import shutil

    from rayrobust.checkpoint import load_checkpoint
    from rayrobust.train import fit

    from conftest import tiny_config

    cfg = tiny_config(tmp_path, data={"name": "parquet", "root": digits_on_s3, "val_size": 100},
                      train={"epochs": 2, "batch_size": 64, "lr": 0.05})
    full = fit(cfg, tmp_path / "a")
    history = full.metrics
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]  # it learns from the streamed images
    assert history[-1]["val_clean_acc"] > 0.5
    final = load_checkpoint(full.checkpoint)
    # An interrupted run: only epoch 1's checkpoint survived. Resuming streams epoch 2 again.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    for entry in (tmp_path / "a" / "checkpoints").iterdir():
        if entry.name.startswith("epoch_001"):
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, tmp_path / "b" / "checkpoints" / entry.name)
    resumed = fit(cfg, tmp_path / "b")
    assert resumed.resumed_from == 1 and resumed.epochs == 2
    again = load_checkpoint(resumed.checkpoint)
    for k, v in final["model"].items():
        assert torch.equal(v, again["model"][k]), k  # the same batches in the same order: the same weights
    assert again["history"][1]["loss"] == history[1]["loss"]


@pytest.mark.ray
def test_streaming_refuses_methods_that_need_the_training_set(ray_cluster, tmp_path):
    from rayrobust.train import fit

    from conftest import tiny_config

    cfg = tiny_config(tmp_path, data={"name": "digits", "stream": True}, train={"method": "spat", "epochs": 1})
    with pytest.raises(ConfigError, match="cannot train on a streamed dataset"):
        fit(cfg, tmp_path / "spat")


# ---------------------------------------------------------------------------------------------
# Bigger than the driver: 402 MB of images on S3, trained on and extracted by Ray workers while the
# driver process (a separate python) grows by less than 100 MB.
# ---------------------------------------------------------------------------------------------
BIG_FILES, BIG_ROWS = 16, 8192  # 131,072 RGB 32x32 images = 402.7 MB as uint8

DRIVER = r'''
import json, os, sys, time

# Every library the driver uses is imported before the baseline: what is measured is the work, not imports.
import numpy as np, pyarrow.dataset, torch, ray, ray.data, ray.train, ray.train.torch
from rayrobust.config import config_from_dict
from rayrobust.semantic.extract import run_extract
from rayrobust.semantic.source import ImageSource
from rayrobust.train import fit


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


base = status("VmRSS")  # after imports
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
root, run_dir, latents = sys.argv[1:4]
cfg = config_from_dict({"run_dir": run_dir, "data": {"name": "parquet", "root": root, "val_size": 0},
                        # The smoke-test model: the epoch's time goes to reading and decoding, which is what is measured.
                        "model": {"name": "tiny_cnn"},
                        "train": {"method": "standard", "epochs": 1, "batch_size": 1024, "lr": 0.05,
                                  "num_workers": 1, "cpus_per_worker": 1, "max_failures": 0}})
t0 = time.time()
result = fit(cfg, run_dir)
t_train = time.time() - t0
# The product's extract stage: its actors read the Parquet rows and write the latents; no image passes here.
manifest = run_extract(result.checkpoint, ImageSource.from_config(cfg.data, cfg.semantic), latents, num_actors=1,
                       batch_size=1024, verbose=False)
t_extract = time.time() - t0 - t_train
print("RESULT " + json.dumps({"base": base, "hwm": status("VmHWM"), "rows": sum(s["rows"] for s in manifest["shards"]),
                  "n": manifest["n"], "loss": result.metrics[-1]["loss"], "train_s": t_train, "extract_s": t_extract}))
'''


@pytest.mark.ray
@pytest.mark.slow
def test_bigger_than_the_driver(ray_cluster, s3_server, tmp_path):
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayrobust.location import Location

    root = s3_server.make_bucket("rr-stream-big") + "/synthetic"
    schema = pa.schema([("index", pa.int64()), ("label", pa.int64()), ("image", pa.binary())])
    rng = np.random.default_rng(0)
    files = []
    for k in range(BIG_FILES):  # one chunk at a time: this process never holds the dataset
        images = rng.integers(0, 256, (BIG_ROWS, 3, 32, 32), dtype=np.uint8)
        table = pa.table([pa.array(np.arange(k * BIG_ROWS, (k + 1) * BIG_ROWS, dtype=np.int64)),
                          pa.array(rng.integers(0, 10, BIG_ROWS)), encode_images(images)], schema=schema)
        target = Location(root) / f"train/part-{k:05d}.parquet"
        with target.fs.open_output_stream(target.path) as sink:
            pq.write_table(table, sink, compression="none", row_group_size=2048)
        files.append({"file": f"train/part-{k:05d}.parquet", "rows": BIG_ROWS, "start": k * BIG_ROWS})
        del images, table
    n = BIG_FILES * BIG_ROWS
    assert n * 3 * 32 * 32 >= 400e6
    (Location(root) / "meta.json").write_text(json.dumps({
        "format": "rayrobust-images-v1", "name": "synthetic", "shape": [3, 32, 32], "num_classes": 10,
        "mean": [0.5] * 3, "std": [0.29] * 3, "counts": {"train": n, "test": 0}, "files": {"train": files, "test": []}}))

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    latents = s3_server.make_bucket("rr-stream-big-latents") + "/latents"
    proc = subprocess.run([sys.executable, str(script), root, str(tmp_path / "run"), latents], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Ray's raylet may print warnings to the driver's stdout too: the result is the line marked RESULT.
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    growth = (result["hwm"] - result["base"]) / 2 ** 20
    print(f"driver peak RSS growth {growth:.1f} MB over {result['base'] / 2 ** 20:.0f} MB after imports; "
          f"train epoch {result['train_s']:.0f}s, extraction {result['extract_s']:.0f}s, {n} images "
          f"({n * 3 * 32 * 32 / 1e6:.0f} MB as uint8)")
    assert result["rows"] == result["n"] == n
    assert np.isfinite(result["loss"])
    assert growth < 100, f"the driver grew by {growth:.1f} MB"
