"""The Ray-free cores: train and evaluate one model with ray, faiss, optuna and pyarrow unimportable.

A subprocess hides those packages (a meta path finder refuses them), trains small_cnn on digits with the
plain loop, runs `rayrobust.evaluate(..., backend="local")` and prints JSON. Its AutoAttack outcome must equal
the sharded Ray path's, image by image, on the same weights and images.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rayrobust
import rayrobust.evaluation.sharded as sharded
import rayrobust.location as location
from rayrobust.errors import ConfigError, StorageError
from rayrobust.models import create_model
from rayrobust.semantic import kmeans

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "faiss", "optuna", "pyarrow")
EVAL = dict(eps=0.1, n=50, n_autoattack=50, pgd_steps=5, seed=1, chunk_size=20, verbose=False)

SCRIPT = r'''
import importlib.abc
import json
import sys

BLOCKED = {blocked!r}


class Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not importable here")
        return None


sys.meta_path.insert(0, Unimportable())

import numpy as np
import torch

torch.set_num_threads(1)  # the Ray actors' thread count, so float reductions match theirs

import rayrobust
import rayrobust.certify  # noqa: F401
import rayrobust.evaluation.sharded as sharded
import rayrobust.semantic.purify  # noqa: F401
from rayrobust.data import load_dataset
from rayrobust.io import read_json, write_json
from rayrobust.methods import create_method
from rayrobust.models import create_model
from rayrobust.semantic import kmeans
from rayrobust.train.loop import make_optimizer, train_epoch, train_val_split

train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
torch.manual_seed(0)
model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=8, mean=train.mean, std=train.std)
split = train_val_split(train.x, train.y, 100, seed=0)
method = create_method("standard")
opt = make_optimizer(model, 0.05, 0.9, 5e-4)
epochs = [train_epoch(model, method, opt, split, epoch=e, epochs=3, batch_size=64, lr=0.05, seed=0)
          for e in range(3)]
torch.save(model.state_dict(), {weights!r})

seen = {{}}
local = sharded.local_autoattack


def recording(*args, **kwargs):
    out = local(*args, **kwargs)
    seen["broken_by"] = out["broken_by"]
    return out


sharded.local_autoattack = recording
res = rayrobust.evaluate(model, (test.x, test.y), backend="local", **{kwargs!r})
write_json({out!r}, res)

rng = np.random.RandomState(0)
x = np.concatenate([rng.randn(100, 4) + 8 * i for i in range(3)]).astype(np.float32)
_, labels, _ = kmeans.kmeans(x, 3, seed=0)
print(json.dumps({{"epochs": epochs, "result": read_json({out!r}), "broken_by": seen["broken_by"],
                  "faiss": kmeans._faiss() is not None, "kmeans_groups": [len(set(labels[i:i + 100])) for i in (0, 100, 200)],
                  "blocked_loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
'''


@pytest.fixture(scope="module")
def ray_free_run(tmp_path_factory):
    """Train + evaluate in a subprocess where ray, faiss, optuna and pyarrow cannot be imported."""
    tmp = tmp_path_factory.mktemp("ray_free")
    weights, out = str(tmp / "model.pt"), str(tmp / "eval.json")
    script = SCRIPT.format(blocked=BLOCKED, weights=weights, out=out, kwargs=EVAL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), weights


@pytest.mark.extended  # a subprocess trains and runs AutoAttack: ~50 s on 2 cores
def test_train_and_evaluate_without_ray_faiss_optuna_pyarrow(ray_free_run):
    run, _ = ray_free_run
    assert run["blocked_loaded"] == []
    assert all(e["loss"] > 0 and e["epoch_seconds"] > 0 for e in run["epochs"])
    res = run["result"]
    assert res["autoattack"]["backend"] == "local" and res["autoattack"]["num_shards"] == 1
    assert res["clean_acc"] > 0.6 and res["autoattack_acc"] <= res["clean_acc"]
    assert len(run["broken_by"]) == 50
    assert not run["faiss"] and run["kmeans_groups"] == [1, 1, 1]  # torch did the assignment step


@pytest.mark.ray
@pytest.mark.extended
def test_local_backend_equals_sharded_ray_path(ray_free_run, ray_cluster, digits, one_thread, monkeypatch):
    run, weights = ray_free_run
    train, test = digits
    model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=8, mean=train.mean, std=train.std)
    model.load_state_dict(torch.load(weights))
    seen = {}
    inner = sharded.sharded_autoattack

    def recording(*args, **kwargs):
        out = inner(*args, **kwargs)
        seen["broken_by"] = out["broken_by"]
        return out

    monkeypatch.setattr(sharded, "sharded_autoattack", recording)
    res = rayrobust.evaluate(model, (test.x, test.y), backend="ray", num_shards=2, **EVAL)
    assert res["autoattack"]["backend"] == "ray" and res["autoattack"]["num_shards"] == 2
    assert seen["broken_by"] == run["broken_by"]
    # The attack is not vacuous here: some images are broken, some survive.
    assert any(b not in (None, "clean") for b in seen["broken_by"]) and any(b is None for b in seen["broken_by"])
    local = run["result"]
    assert res["autoattack"]["per_attack"] == local["autoattack"]["per_attack"]
    assert (res["autoattack_acc"], res["clean_acc"], res["pgd_acc"]) == \
        (local["autoattack_acc"], local["clean_acc"], local["pgd_acc"])


def test_bad_backend_is_a_one_line_config_error(digits_model, digits):
    _, test = digits
    with pytest.raises(ConfigError, match=r"backend='gpu' is unknown; use one of 'ray', 'local'") as err:
        rayrobust.evaluate(digits_model, (test.x, test.y), eps=0.1, n=10, n_autoattack=5, backend="gpu")
    assert "\n" not in str(err.value)


def test_torch_assignment_step_equals_faiss(monkeypatch):
    rng = np.random.RandomState(0)
    x, centroids = rng.randn(3000, 16).astype(np.float32), rng.randn(9, 16).astype(np.float32)
    labels, dist = kmeans.nearest(x, centroids)
    monkeypatch.setattr(kmeans, "_faiss", lambda: None)
    monkeypatch.setattr(kmeans, "TORCH_BLOCK", 9 * 700)  # several blocks of rows
    labels_t, dist_t = kmeans.nearest(x, centroids)
    assert labels_t.dtype == np.int64 and dist_t.dtype == np.float32
    assert (labels_t == labels).all() and np.allclose(dist_t, dist, rtol=1e-5, atol=1e-4)


def _storage_walk(root: str) -> list:
    """A run through what Location does to a local directory; what it saw, with `root` left out."""
    run = location.Location(root) / "run"
    seen = [run.exists()]
    (run / "a" / "x.json").write_text("{}")
    (run / "b.txt").write_text("hi")
    (run / "c").mkdir()
    seen += [[p.name for p in run.iterdir()], run.files(), (run / "b.txt").is_file(), run.is_dir(), (run / "b.txt").size()]
    (run / "b.txt").copy_to(run / "d" / "b2.txt")
    (run / "b.txt").copy_to(location.Location(os.path.join(root, "run", "e.txt")))
    (run / "f.bin").upload(os.path.join(root, "run", "b.txt"))
    with (run / "f.bin").open_input() as f:
        seen.append(f.read())
    (run / "a").delete()
    (run / "b.txt").delete()
    (run / "absent").delete()
    seen += [run.files(), location.Location(f"file://{root}/run").files(), (run / "absent").iterdir()]
    with pytest.raises(FileNotFoundError):
        (run / "absent").read_bytes()
    return seen


def test_local_paths_work_without_pyarrow(tmp_path, monkeypatch):
    with_pyarrow = _storage_walk(str(tmp_path / "arrow"))
    monkeypatch.setattr(location, "_fs_module", lambda: location._PLAIN_FS)
    assert _storage_walk(str(tmp_path / "plain")) == with_pyarrow
    assert isinstance(location.Location(tmp_path).fs, location._PlainLocalFileSystem)


def test_object_storage_without_pyarrow_is_a_storage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.fs", None)  # `import pyarrow.fs` fails
    with pytest.raises(StorageError, match="object storage needs pyarrow"):
        location.Location("s3://rayrobust-bucket/run")
