"""Clustering and extraction benchmarks for the SRD latent pipeline.

1. k-means: rayrobust's faiss k-means (`rayrobust.semantic.kmeans.kmeans`: faiss assignment, greedy
   k-means++ seeding, float64 centroid sums) against scikit-learn `KMeans` (lloyd, k-means++
   init) on the same latents: SYNTHETIC planted latents, 60,000 x 128, 10 classes of 6,000, each a
   mixture of 1..5 Gaussian modes; every K in [1, K_max=5] for every class (50 fits each side),
   one thread each, same iteration cap (25), best of 3 inits each. Reports total time and inertia.
2. The full adaptive stage (all fits + silhouette selection) and how often it finds the planted K.
3. Ray Data extraction throughput (small_cnn over Fashion-MNIST) with 1 and 2 actors.

The last line is `speedup=<sklearn time / ours> inertia_gap=<(ours - sklearn) / sklearn>`.

    python bench/clustering.py                 # all of it (~1 min on 2 cores)
    python bench/clustering.py --skip-extract  # k-means only
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def planted_latents(n_classes: int = 10, per_class: int = 6000, d: int = 128, sep: float = 20.0, seed: int = 0):
    """Class c is a mixture of m_c = c % 5 + 1 unit Gaussians (centres ~sep apart), ReLU-free, float32."""
    rng = np.random.RandomState(seed)
    xs, ys, modes = [], [], []
    for c in range(n_classes):
        m = c % 5 + 1
        centres = rng.randn(m, d) * sep / np.sqrt(2 * d)  # (m, d)
        which = rng.randint(m, size=per_class)
        xs.append(centres[which] + rng.randn(per_class, d))
        ys.append(np.full(per_class, c))
        modes.append(m)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys), modes


def bench_kmeans(x: np.ndarray, y: np.ndarray, k_max: int, iters: int, n_init: int, seed: int):
    import faiss
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from rayrobust.semantic.kmeans import faiss_threads, kmeans, nearest

    t = {"ours": 0.0, "sklearn": 0.0, "faiss": 0.0}
    inertia = {"ours": 0.0, "sklearn": 0.0, "faiss": 0.0}
    worst = 0.0
    with threadpool_limits(1), faiss_threads(1):  # sklearn's OpenMP/BLAS, faiss's OpenMP: one thread each
        for c in np.unique(y):
            xc = np.ascontiguousarray(x[y == c])
            for k in range(1, k_max + 1):  # interleaved fit by fit, so machine noise hits all alike
                t0 = time.perf_counter()
                _, _, ours = kmeans(xc, k, iters=iters, seed=seed, n_init=n_init, sample_size=2000)
                t["ours"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=iters, algorithm="lloyd",
                            random_state=seed).fit(xc)
                t["sklearn"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                fk = faiss.Kmeans(xc.shape[1], k, niter=iters, nredo=n_init, seed=seed + 1,
                                  max_points_per_centroid=10 ** 6)  # no subsampling: all 6000 points
                fk.train(xc)
                t["faiss"] += time.perf_counter() - t0
                inertia["ours"] += ours
                inertia["sklearn"] += float(km.inertia_)
                inertia["faiss"] += float(nearest(xc, fk.centroids)[1].astype(np.float64).sum())
                worst = max(worst, abs(ours - km.inertia_) / km.inertia_)
    return t, inertia, worst


def bench_adaptive(x: np.ndarray, y: np.ndarray, modes, k_max: int, seed: int):
    from rayrobust.semantic.clustering import cluster_latents

    t0 = time.perf_counter()
    res = cluster_latents(np.arange(len(y)), y, x, k_max=k_max, threshold=0.2, seed=seed)
    seconds = time.perf_counter() - t0
    right = sum(res.k_per_class[c] == m for c, m in enumerate(modes))
    return seconds, right, res.k_per_class


def bench_extract(n: int, actors_list=(1, 2)):
    import ray
    import torch

    from rayrobust.data import load_dataset
    from rayrobust.models import create_model
    from rayrobust.semantic.extract import run_extract

    ds = load_dataset("fashion_mnist", "train", limit=n)
    torch.manual_seed(0)
    model = create_model("small_cnn", mean=ds.mean, std=ds.std).eval()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows = []
    try:
        for actors in actors_list:
            with tempfile.TemporaryDirectory() as out:
                m = run_extract(model, ds, out, num_actors=actors, batch_size=256, verbose=False)
            t = m["timings"]
            rows.append((actors, t["seconds"], t["images_per_s"], t["first_output_s"], len(m["workers"])))
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=6000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k-max", type=int, default=5)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--n-init", type=int, default=3, help="k-means++ initialisations per fit, both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extract-n", type=int, default=60000, help="Fashion-MNIST images for the Ray Data benchmark")
    ap.add_argument("--skip-extract", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAYROBUST_DASHBOARD", "0")

    x, y, modes = planted_latents(per_class=args.n_per_class, d=args.dim, seed=args.seed)
    print(f"latents: SYNTHETIC planted, {x.shape[0]} x {x.shape[1]}, {len(modes)} classes, modes per class {modes}")
    t, inertia, worst = bench_kmeans(x, y, args.k_max, args.iters, args.n_init, args.seed)
    fits = len(modes) * args.k_max
    print(f"k-means, {fits} fits (every class, K=1..{args.k_max}), best of {args.n_init} inits, "
          f"{args.iters} iterations max, 1 thread each:")
    names = {"ours": "rayrobust k-means (faiss assignment, shardable)", "sklearn": "sklearn KMeans (lloyd, k-means++)",
             "faiss": "faiss.Kmeans (C++, random init; reference)"}
    for key, name in names.items():
        print(f"  {name:<47}: {t[key]:7.2f} s   total inertia {inertia[key]:.6e}")
    print(f"  largest per-fit inertia gap, rayrobust vs sklearn: {worst:.4f}")
    seconds, right, ks = bench_adaptive(x, y, modes, args.k_max, args.seed)
    print(f"adaptive stage (all fits + silhouette on 2000-point samples): {seconds:.2f} s, "
          f"planted K found in {right}/{len(modes)} classes, K per class {list(ks.values())}")
    if not args.skip_extract:
        print(f"Ray Data extraction, small_cnn over {args.extract_n} Fashion-MNIST images, batch 256, local Ray 2 CPUs:")
        for actors, secs, ips, first, workers in bench_extract(args.extract_n):
            print(f"  {actors} actor(s): {secs:6.2f} s wall, {ips:7.0f} images/s end to end (actor start included; "
                  f"first shard after {first:.2f} s), {workers} worker(s) did work")
    gap = (inertia["ours"] - inertia["sklearn"]) / inertia["sklearn"]
    print(f"speedup={t['sklearn'] / t['ours']:.2f} inertia_gap={gap:.4f}")


if __name__ == "__main__":
    main()
