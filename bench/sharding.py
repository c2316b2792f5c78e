"""Scaling of sharded AutoAttack: the same chunks on 1 Ray actor and on N actors, in one run.

Trains a PGD-AT small_cnn on digits for a few seconds, then runs AutoAttack standard on the first `--n` test
images through `rayrobust.evaluation.sharded.sharded_autoattack` with 1 actor and with `--actors` actors (the
same chunk plan and seeds), checks that every image's outcome is identical, and prints
`efficiency=<speed-up / actors>` as the last line (speed-up = seconds with 1 actor / seconds with N; target >= 0.8).
Each actor holds one CPU and one torch thread (a GPU each where the cluster has GPUs).

    python bench/sharding.py                      # 200 images, 2 actors, a new local Ray cluster
    RAY_ADDRESS=auto python bench/sharding.py --actors 8 --n 1000      # a running cluster
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rayrobust.attacks import summarize_autoattack  # noqa: E402
from rayrobust.data import load_dataset  # noqa: E402
from rayrobust.evaluation.sharded import sharded_autoattack  # noqa: E402
from rayrobust.methods import create_method  # noqa: E402
from rayrobust.models import create_model  # noqa: E402
from rayrobust.raycluster import ensure_ray  # noqa: E402
from rayrobust.train.loop import make_optimizer, train_epoch, train_val_split  # noqa: E402


def robust_digits_model(epochs: int, seed: int = 0) -> torch.nn.Module:
    """small_cnn trained with PGD-AT (eps 0.1, 3 steps) on digits; eval mode, on the CPU."""
    train = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=8, mean=train.mean, std=train.std)
    split = train_val_split(train.x, train.y, 0, seed=seed)
    method = create_method("pgd_at", eps=0.1, steps=3)
    opt = make_optimizer(model, 0.05, 0.9, 5e-4)
    for epoch in range(epochs):
        train_epoch(model, method, opt, split, epoch=epoch, epochs=epochs, batch_size=64, lr=0.05, seed=seed)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="test images to attack")
    ap.add_argument("--actors", type=int, default=2, help="actors of the sharded run (compared with 1)")
    ap.add_argument("--chunk-size", type=int, default=None, help="images per chunk (default: 4 chunks per actor)")
    ap.add_argument("--epochs", type=int, default=8, help="PGD-AT epochs of the model")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local cluster)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    chunk = args.chunk_size or max(1, math.ceil(args.n / (4 * args.actors)))
    ensure_ray(args.address, num_cpus=None if args.address else args.actors)
    t0 = time.perf_counter()
    model = robust_digits_model(args.epochs)
    test = load_dataset("digits", "test", limit=args.n)
    x, y = test.x[:args.n], test.y[:args.n]
    print(f"model: small_cnn, PGD-AT {args.epochs} epochs on digits ({time.perf_counter() - t0:.1f}s); "
          f"AutoAttack standard eps {args.eps} on {len(x)} images in chunks of {chunk}", flush=True)
    runs = {}
    for actors in (1, args.actors):
        res = sharded_autoattack(model, x, y, eps=args.eps, seed=0, chunk_size=chunk, num_shards=actors)
        runs[actors] = res
        summary = summarize_autoattack(res["broken_by"])
        print(f"{res['num_shards']} actor(s): {res['seconds']:.1f}s  clean {summary['clean']:.3f}  "
              f"robust {summary['robust']:.3f}  images per worker {sorted(res['workers'].values())}", flush=True)
    one, many = runs[1], runs[args.actors]
    if one["broken_by"] != many["broken_by"]:
        diff = [i for i, (a, b) in enumerate(zip(one["broken_by"], many["broken_by"])) if a != b]
        raise SystemExit(f"the sharded run differs from the 1-actor run on images {diff[:20]}")
    print(f"identical per-image results on {len(x)} images")
    actors = many["num_shards"]
    speedup = one["seconds"] / many["seconds"]
    print(f"speed-up {speedup:.2f}x on {actors} actors")
    print(f"efficiency={speedup / actors:.3f}")


if __name__ == "__main__":
    main()
