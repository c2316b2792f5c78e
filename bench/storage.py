"""What keeping the run directory in object storage costs: the demo's pgd_at training + evaluation with
run_dir on S3 (a moto server on loopback, started here) vs a local run_dir, in one process.

    .venv/bin/python bench/storage.py                 # reduced demo settings (see REDUCED), ~6 minutes on 2 CPUs
    .venv/bin/python bench/storage.py --full          # configs/demo.yaml's pgd_at as is (3 epochs, n_eval 1000, AA 200)
    .venv/bin/python bench/storage.py --set train.epochs=2 ...

One local Ray instance serves both runs (started, and warmed up with one dataset load, before any
timing). Each run is `rayrobust.train.fit` + `rayrobust.evaluation.evaluate_checkpoint` into its own
run directory: first the local one, then the S3 one. The S3 server's AWS_* variables are set before Ray
starts, so Ray Train's workers write checkpoints to the bucket themselves. Both runs must produce the
same numbers (same seed): the comparison is between equal work. The last line is
`ratio=<s3 seconds / local seconds>` (target: <= 1.15).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHOD = "pgd_at"
# The demo's pgd_at takes ~5 minutes per run on a 2-core CPU machine (two runs: over the ~6-minute budget);
# these keep its data, model, attack and batch size, and shorten training and evaluation.
REDUCED = ["train.epochs=1", "data.train_limit=10500", "eval.n_eval=500", "eval.n_autoattack=100"]
RESULT_KEYS = ("clean_acc", "pgd_acc", "autoattack_acc")


def start_s3() -> tuple:
    """A moto S3 server on a free loopback port; (process, AWS_* environment)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}")
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "rayrobust-bench",
           "AWS_SECRET_ACCESS_KEY": "rayrobust-bench-secret", "AWS_REGION": "us-east-1"}
    return proc, env


def make_bucket(env: dict, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"]
                 ).create_bucket(Bucket=name)


def run_once(cfg, root: str) -> tuple:
    """fit + evaluate_checkpoint of METHOD in run directory `root`; (seconds, evaluation, stored bytes)."""
    from rayrobust.evaluation import evaluate_checkpoint
    from rayrobust.location import Location
    from rayrobust.train import fit

    method_dir = Location(root) / METHOD
    t0 = time.perf_counter()
    result = fit(cfg, method_dir, method=METHOD)
    res = evaluate_checkpoint(cfg.for_method(METHOD), result.checkpoint, method_dir / "eval.json", label=METHOD)
    seconds = time.perf_counter() - t0
    stored = sum(size for _, size in Location(root).files())
    return seconds, res, stored


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--full", action="store_true", help="the demo's settings, not REDUCED")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = ([] if args.full else list(REDUCED)) + args.overrides

    proc, env = start_s3()
    os.environ.update(env)  # before Ray starts: its workers inherit them
    os.environ.setdefault("RAYROBUST_DASHBOARD", "0")
    local_root = Path(tempfile.mkdtemp(prefix="rayrobust-bench-storage-"))
    try:
        import ray

        from rayrobust.config import load_config
        from rayrobust.data import load_dataset
        from rayrobust.raycluster import ensure_ray

        bucket = "rayrobust-bench"
        make_bucket(env, bucket)
        cfg = load_config(args.config, overrides)
        mcfg = cfg.for_method(METHOD)
        print(f"config: {args.config} ({METHOD}), overrides: {' '.join(overrides) or 'none'}"
              + ("" if args.full else "  [reduced from the demo's settings; --full for the demo's own]"), flush=True)
        print(f"{METHOD}: {mcfg.train.epochs} epoch(s) on {mcfg.data.train_limit} {mcfg.data.name} images, "
              f"PGD-{mcfg.train.attack_steps}, {mcfg.train.num_workers} worker(s) x {mcfg.train.cpus_per_worker} CPU; "
              f"eval n={mcfg.eval.n_eval}, AutoAttack n={mcfg.eval.n_autoattack}", flush=True)
        ensure_ray(cfg.ray_address)  # started before timing; both runs share it
        load_dataset(mcfg.data.name, "train", root=mcfg.data.root, limit=mcfg.data.train_limit)  # warm file cache

        local_s, local_res, local_bytes = run_once(cfg, str(local_root / "demo"))
        print(f"local run_dir {local_root / 'demo'}: {local_s:.1f}s ({local_bytes / 1e6:.1f} MB written)", flush=True)
        s3_root = f"s3://{bucket}/{uuid.uuid4().hex[:8]}/demo"
        s3_s, s3_res, s3_bytes = run_once(cfg, s3_root)
        print(f"s3 run_dir {s3_root} (moto on loopback): {s3_s:.1f}s ({s3_bytes / 1e6:.1f} MB stored)", flush=True)

        same = all(local_res.get(k) == s3_res.get(k) for k in RESULT_KEYS)
        print("results: " + ", ".join(f"{k} {local_res.get(k)} / {s3_res.get(k)}" for k in RESULT_KEYS)
              + ("  (local / s3: equal)" if same else "  (local / s3: DIFFERENT)"), flush=True)
        print(f"local_time={local_s:.1f}s s3_time={s3_s:.1f}s")
        print(f"ratio={s3_s / local_s:.3f}")
        ray.shutdown()
        return 0 if same else 1
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(local_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
