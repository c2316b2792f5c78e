"""Shared fixtures: a local 2-CPU Ray cluster for the `ray` tests and tiny trained models."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAYROBUST_DASHBOARD", "0")  # tests start Ray without the dashboard (faster)


class S3Server:
    """A standalone S3-protocol server (moto) on loopback; clients find it through the standard AWS_* variables."""

    ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")

    def __init__(self):
        import socket
        import subprocess
        import sys
        import time
        import urllib.request
        from pathlib import Path

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.proc.kill()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}")
                time.sleep(0.2)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "rayrobust-test",
                    "AWS_SECRET_ACCESS_KEY": "rayrobust-test-secret", "AWS_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"], region_name=self.env["AWS_REGION"])

    def make_bucket(self, name: str) -> str:
        """Create (or empty) bucket `name`; returns s3://name."""
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            for key in self.keys(name):
                c.delete_object(Bucket=name, Key=key)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list:
        """Every object key in `bucket` under `prefix`, sorted."""
        out, token = [], None
        c = self.client()
        while True:
            page = c.list_objects_v2(Bucket=bucket, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(out)
            token = page["NextContinuationToken"]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the session, with AWS_* set in this process (and so in the Ray cluster it starts)."""
    server = S3Server()
    saved = {k: os.environ.get(k) for k in S3Server.ENV}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster (2 CPUs) shared by every test that needs Ray; its workers reach the S3 server."""
    import ray

    if not ray.is_initialized():
        # With the dashboard, as rayrobust's own local clusters start it.
        ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and do not stall on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    from rayrobust.data import load_dataset

    return load_dataset("digits", "train"), load_dataset("digits", "test")


def digits_arrays():
    """All 1797 scikit-learn digits as (x (N,1,8,8) in [0,1], y)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8) in [0,1]
    return x, torch.tensor(d.target)


def train_mlp(x, y, epochs=30, seed=0):
    """A 64-64-10 MLP trained with Adam for a few seconds; eval mode, no gradients left behind."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def loss_before_after(method, model, x, y, *, steps: int = 40) -> tuple:
    """A method's loss on (x, y) before and after `steps` training steps on that batch (same RNG state)."""
    from rayrobust.train.loop import make_optimizer, train_step

    opt = make_optimizer(model, 0.05, 0.9, 0.0)
    torch.manual_seed(0)
    first = method.loss(model, x, y)[0].item()
    for _ in range(steps):
        train_step(model, method, opt, x, y)
    torch.manual_seed(0)
    return first, method.loss(model, x, y)[0].item()


def train_plain(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 30, lr: float = 0.05,
                seed: int = 0) -> torch.nn.Module:
    """A few seconds of plain full-batch-ish training, for tests that need a sensible model."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for s in range(0, len(x), 128):
            idx = perm[s:s + 128]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_model(digits):
    """small_cnn trained on 8x8 digits for a few seconds (clean accuracy > 0.9)."""
    from rayrobust.models import create_model

    train, _ = digits
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=8, mean=train.mean, std=train.std)
    return train_plain(model, train.x, train.y)


def tiny_config(tmp_path, **sections):
    """An ExperimentConfig for a seconds-long run on digits."""
    from rayrobust.config import config_from_dict

    raw = {
        "name": "tiny", "run_dir": str(tmp_path / "run"), "methods": ["standard"],
        "data": {"name": "digits", "val_size": 100},
        "model": {"name": "small_cnn"},
        "train": {"method": "standard", "epochs": 2, "batch_size": 64, "lr": 0.05, "eps": 0.1,
                  "attack_steps": 2, "num_workers": 1, "cpus_per_worker": 1, "val_pgd_steps": 2},
        # the report's robust-vs-eps curve and gallery off: tests that check them turn them on
        "eval": {"eps": 0.1, "n_eval": 100, "n_autoattack": 20, "pgd_steps": 5, "num_shards": 2, "batch_size": 100,
                 "eps_curve": False, "gallery": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return config_from_dict(raw)


# The SRD pipeline on 2 CPUs: the source (standard, not in `methods`) -> extract -> cluster -> dictionaries ->
# srd -> evaluate srd, in about a minute per stage. tests/test_srd.py checks the run; tests/test_cluster_s3.py
# runs the same configuration as a job on a 2-node cluster with an s3:// run_dir and compares with this run.
SRD_SEMANTIC = {"k_max": 2, "silhouette_sample": 200, "kmeans_iters": 10, "kmeans_n_init": 1, "num_actors": 2,
                "num_shards": 2, "dict_actors": 2, "n_atoms": 8, "dict_iters": 3, "max_images_per_cluster": 60,
                "max_patches_per_cluster": 500, "fista_iters": 10, "extract_batch_size": 256}
SRD_PIPELINE = {
    "name": "srd-pipeline", "run_dir": "runs/srd-pipeline", "methods": ["srd"],
    "stages": ["train", "extract", "cluster", "dictionaries", "evaluate"],
    "data": {"name": "digits", "val_size": 100},
    "model": {"name": "small_cnn"},
    # 2 Ray Train workers of 1 CPU each: on a 1 + 1 CPU cluster, one per node
    "train": {"method": "standard", "epochs": 1, "batch_size": 64, "lr": 0.05, "eps": 0.1, "attack_steps": 2,
              "num_workers": 2, "cpus_per_worker": 1, "val_pgd_steps": 2, "method_args": {"srd": {"latent_weight": 0.1}}},
    "semantic": SRD_SEMANTIC,
    # AutoAttack through the purifier is query-bound (Square's 5000 queries per chunk with a robust point):
    # 10 images in 2 chunks of 5, one per AutoAttack actor.
    "eval": {"eps": 0.1, "n_eval": 60, "n_autoattack": 10, "pgd_steps": 5, "batch_size": 60, "num_shards": 2,
             "chunk_size": 5, "checks": True, "eps_curve": False, "gallery": 2},
}


@pytest.fixture(scope="session")
def srd_pipeline(ray_cluster, tmp_path_factory):
    """SRD_PIPELINE run once on the local 2-CPU Ray with a local run_dir: (config, summary)."""
    import json

    from rayrobust.config import config_from_dict
    from rayrobust.pipeline import run_pipeline

    raw = json.loads(json.dumps(SRD_PIPELINE))
    raw["run_dir"] = str(tmp_path_factory.mktemp("srd-pipeline") / "run")
    cfg = config_from_dict(raw)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cfg, run_pipeline(cfg)
    finally:
        torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Every test that starts Ray (through the shared cluster fixtures) carries the `ray` mark, so
    `-m "not ray"` is a Ray-free run."""
    ray_fixtures = {"ray_cluster", "srd_pipeline"}
    unmarked = [item.nodeid for item in items
                if ray_fixtures & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError(f"tests that start Ray need @pytest.mark.ray: {', '.join(unmarked)}")
