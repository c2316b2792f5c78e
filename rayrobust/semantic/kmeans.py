"""Lloyd's k-means split into a data side and a driver side, as in faiss's own distributed k-means
(`faiss/contrib/clustering.py`: a `DatasetAssign` returns per-centroid sums; the driver updates).

- `LatentShard` holds some rows (of every class) and does the assignment step with faiss (with
  torch, on the GPU when there is one, where faiss is not installed): for each requested job (class c,
  centroids C) it returns per-centroid sums, counts, inertia and how many of its rows changed
  cluster. It can live in this process or inside a Ray actor unchanged.
- `KMeansJob` is the driver side of one k-means run: k-means++ seeding on a fixed sample, the
  centroid update from summed statistics, faiss's empty-cluster split, the stopping rule.

Because the driver only ever sees sums over shards, one shard or many give the same clusters for
the same seed (sums are float64; the split rule and the seeding use the job's own seeded RNG).

Example:
    >>> centroids, labels, inertia = kmeans(x, 4, seed=0)   # x (N, d) float32, one process
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

StepStats = Tuple[np.ndarray, np.ndarray, float, int]  # sums (K, d) f64, counts (K,) i64, inertia, changed
TORCH_BLOCK = 1 << 24  # distance-matrix entries (rows x centroids) per block of the torch assignment step


@functools.lru_cache(maxsize=None)
def _faiss():
    """The faiss module, or None when it is not installed (the assignment step then runs in torch)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@contextlib.contextmanager
def faiss_threads(n: Optional[int]) -> Iterator[None]:
    """Run faiss (or, without faiss, torch on the CPU) with n threads (None = leave as is). One thread per
    CPU a Ray actor owns: faiss's OpenMP threads spin, and on a busy machine 2 threads can be 100x slower than 1."""
    if not n:
        yield
        return
    faiss = _faiss()
    if faiss is None:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _nearest_torch(x: np.ndarray, centroids: np.ndarray, device: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """faiss.knn(x, centroids, 1) in torch (on `device`; default the GPU when present): ||x||^2 - 2 x.c + ||c||^2
    in float32, clamped at 0 as faiss does, in blocks of rows. x (N, d), centroids (K, d) -> (labels (N,), dist (N,))."""
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    c = torch.tensor(centroids, device=device)  # (K, d)
    c_sq = (c * c).sum(1)  # (K,)
    labels, dist = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    rows = max(1, TORCH_BLOCK // max(1, len(c)))
    for s in range(0, len(x), rows):
        xb = torch.tensor(x[s:s + rows], device=device)  # (B, d), a copy: x may be read-only
        d2 = ((xb * xb).sum(1, keepdim=True) - 2 * xb @ c.T + c_sq).clamp_(min=0)  # (B, K)
        best, idx = d2.min(1)
        labels[s:s + len(xb)], dist[s:s + len(xb)] = idx.cpu().numpy(), best.cpu().numpy()
    return labels, dist


def nearest(x: np.ndarray, centroids: np.ndarray, threads: Optional[int] = 1) -> Tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int64, squared L2 distances (N,) float32) of each row's nearest centroid (faiss; torch,
    on the GPU when there is one, where faiss is not installed)."""
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    x, centroids = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(centroids, np.float32)
    faiss = _faiss()
    with faiss_threads(threads):
        if faiss is None:
            return _nearest_torch(x, centroids)
        dist, idx = faiss.knn(x, centroids, 1)
    return idx[:, 0].astype(np.int64), dist[:, 0]


def cluster_sums(x64: np.ndarray, labels: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (k, d) float64 and counts (k,) int64 of rows x64 (N, d) float64.

    float64 sums of float32 values are (all but) exact, so they do not depend on how rows are
    split into shards. A sparse (k, N) indicator product: N*d adds, single-threaded, ~3x faster
    than a dense one-hot matmul.
    """
    import scipy.sparse as sp

    n = len(labels)
    indicator = sp.csc_matrix((np.ones(n), np.asarray(labels, np.int64), np.arange(n + 1)), shape=(k, n))  # (k, N)
    return np.asarray(indicator @ x64), np.bincount(labels, minlength=k).astype(np.int64)


class LatentShard:
    """Rows of latents held for the assignment step. Plain class; a Ray actor at the call site.

    index (N,) int64, labels (N,) int64 class ids, latents (N, d) float32. Rows are kept grouped by
    class (then by index), so a class's rows are a contiguous view; memory ~3x the latents (float32
    rows + a float64 copy for exact sums).
    """

    def __init__(self, index: np.ndarray, labels: np.ndarray, latents: np.ndarray, threads: Optional[int] = 1):
        self.threads = threads  # faiss OpenMP threads for the assignment step
        order = np.lexsort((np.asarray(index), np.asarray(labels)))  # by class, then by index
        self.index = np.asarray(index, np.int64)[order]
        self.labels = np.asarray(labels, np.int64)[order]
        self.x = np.ascontiguousarray(np.asarray(latents, np.float32)[order])  # (N, d)
        classes, starts, sizes = np.unique(self.labels, return_index=True, return_counts=True)
        self._rows: Dict[int, slice] = {int(c): slice(s, s + n) for c, s, n in zip(classes, starts, sizes)}
        self._x64: Dict[int, np.ndarray] = {}  # class -> its rows (n_c, d) as float64, made on first use
        self._assign: Dict[str, np.ndarray] = {}  # job id -> this shard's last labels for that job

    @classmethod
    def from_parquet(cls, paths: Sequence[str], threads: Optional[int] = 1) -> "LatentShard":
        """Load latent Parquet shards (the extract stage's files, local paths or URIs) into one shard."""
        import pyarrow as pa

        from .extract import _list_column, read_shard

        table = pa.concat_tables([read_shard(p) for p in paths])
        dim = table.schema.field("latent").type.list_size
        return cls(table.column("index").to_numpy(), table.column("label").to_numpy(),
                   _list_column(table.column("latent"), dim), threads)

    # --- description -----------------------------------------------------------------------------
    def summary(self) -> Dict[str, object]:
        """dim, per-class counts and per-class count of non-finite rows (NaN/inf latents)."""
        bad = ~np.isfinite(self.x).all(axis=1)
        return {"dim": int(self.x.shape[1]), "n": len(self.index),
                "counts": {c: r.stop - r.start for c, r in self._rows.items()},
                "nonfinite": {c: int(bad[r].sum()) for c, r in self._rows.items() if bad[r].any()}}

    def class_indices(self) -> Dict[int, np.ndarray]:
        """{class: dataset indices of this shard's rows of that class (sorted)}."""
        return {c: self.index[r] for c, r in self._rows.items()}

    def take(self, requests: Dict[int, np.ndarray]) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
        """{class: wanted dataset indices} -> {class: (index (M,), latents (M, d))} of the rows held here."""
        out = {}
        for c, wanted in requests.items():
            rows = self._rows.get(c, slice(0, 0))
            hit = np.isin(self.index[rows], wanted)
            out[c] = (self.index[rows][hit], self.x[rows][hit])
        return out

    # --- the assignment step -----------------------------------------------------------------------
    def _class_x(self, c: int) -> Tuple[np.ndarray, np.ndarray]:
        """Class c's rows as float32 (a view, for faiss) and float64 (for exact sums)."""
        x = self.x[self._rows.get(c, slice(0, 0))]  # (n_c, d) contiguous view
        if c not in self._x64:
            self._x64[c] = x.astype(np.float64)
        return x, self._x64[c]

    def step(self, jobs: Sequence[Tuple[str, int, np.ndarray]]) -> Dict[str, StepStats]:
        """One assignment step for each (job id, class, centroids (K, d)) -> {job id: StepStats}."""
        out = {}
        for job, c, centroids in jobs:
            x, x64 = self._class_x(c)
            labels, dist = nearest(x, centroids, self.threads)
            sums, counts = cluster_sums(x64, labels, len(centroids))
            prev = self._assign.get(job)
            changed = len(labels) if prev is None else int((prev != labels).sum())
            self._assign[job] = labels.astype(np.int32)  # kept for the next step's `changed` count
            out[job] = (sums, counts, float(dist.astype(np.float64).sum()), changed)
        return out

    def finish(self, jobs: Sequence[Tuple[str, int, np.ndarray]]) -> Dict[str, tuple]:
        """Final pass for each (job, class, centroids): (index, labels, sums, sumsq, counts, inertia)."""
        out = {}
        for job, c, centroids in jobs:
            x, x64 = self._class_x(c)
            labels, dist = nearest(x, centroids, self.threads)
            sums, counts = cluster_sums(x64, labels, len(centroids))
            sumsq, _ = cluster_sums(x64 * x64, labels, len(centroids))
            index = self.index[self._rows.get(c, slice(0, 0))]
            out[job] = (index, labels, sums, sumsq, counts, float(dist.astype(np.float64).sum()))
        return out

    def forget(self, jobs: Sequence[str]) -> None:
        for job in jobs:
            self._assign.pop(job, None)


def kmeans_plus_plus(sample: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn): each new centre is the best of 2 + log(k) D^2-sampled
    candidates (lowest resulting potential). sample (M, d) -> (k, d) float32 centroids."""
    x = np.asarray(sample, np.float64)
    m = len(x)
    trials = 2 + int(np.log(k))
    sq = (x * x).sum(1)  # (M,)
    centers = [rng.randint(m)]
    d2 = np.maximum(sq - 2 * x @ x[centers[0]] + sq[centers[0]], 0)  # (M,) squared distance to nearest centre
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: any point will do
            centers.append(rng.randint(m))
            continue
        cand = np.minimum(np.searchsorted(np.cumsum(d2), rng.uniform(0, total, trials)), m - 1)  # (T,)
        dc = np.maximum(sq[None] - 2 * x[cand] @ x.T + sq[cand][:, None], 0)  # (T, M)
        pot = np.minimum(d2[None], dc)  # (T, M)
        best = int(pot.sum(1).argmin())
        centers.append(int(cand[best]))
        d2 = pot[best]
    return x[centers].astype(np.float32)


def split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.RandomState) -> int:
    """faiss's rule for empty clusters: split a populous one (probability ~ size - 1) in two,
    nudging the copies apart by a factor 1 +- 1/1024 per coordinate. In place; returns the splits."""
    counts = counts.astype(np.float64).copy()
    fac = np.ones(centroids.shape[1], np.float32)
    fac[::2] += 1 / 1024.0
    fac[1::2] -= 1 / 1024.0
    splits = 0
    for ci in np.flatnonzero(counts == 0):
        p = np.maximum(counts - 1, 0)
        if p.sum() <= 0:
            break
        cj = rng.choice(len(counts), p=p / p.sum())
        c = centroids[cj].copy()
        centroids[ci], centroids[cj] = c * fac, c / fac
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
        splits += 1
    return splits


class KMeansJob:
    """The driver side of one k-means run (class c, K clusters): seed, update, stop."""

    def __init__(self, job_id: str, c: int, k: int, sample: np.ndarray, *, iters: int, seed: int):
        self.id, self.c, self.k = job_id, c, k
        self.rng = np.random.RandomState(seed)
        self.centroids = kmeans_plus_plus(sample, k, self.rng)  # (k, d)
        self.max_iters = 1 if k == 1 else iters  # one pass gives the exact mean when K = 1
        self.iters = 0
        self.inertia: List[float] = []  # per iteration, at the centroids it assigned with
        self.splits = 0
        self.done = False

    def update(self, stats: Sequence[StepStats]) -> None:
        """New centroids from the shards' statistics (summed in shard order)."""
        sums = np.sum([s[0] for s in stats], axis=0)  # (k, d) float64
        counts = np.sum([s[1] for s in stats], axis=0)  # (k,)
        changed = sum(s[3] for s in stats)
        self.inertia.append(float(sum(s[2] for s in stats)))
        self.iters += 1
        if changed == 0:  # same partition as last time: the centroids would not move
            self.done = True
            return
        new = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        new[counts == 0] = self.centroids[counts == 0]
        self.splits += split_empty(new, counts, self.rng)
        self.centroids = new
        self.done = self.iters >= self.max_iters


def run_jobs(jobs: Sequence[KMeansJob], step) -> None:
    """Drive jobs to completion in lockstep rounds; `step(list of (id, class, centroids))` returns,
    per shard, {job id: StepStats}. All active jobs share one call per shard per round."""
    active = list(jobs)
    while active:
        per_shard = step([(j.id, j.c, j.centroids) for j in active])
        for j in active:
            j.update([s[j.id] for s in per_shard])
        active = [j for j in active if not j.done]


def kmeans(x: np.ndarray, k: int, *, iters: int = 25, seed: int = 0, n_init: int = 1,
           sample_size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, float]:
    """Single-process k-means on x (N, d): (centroids (k, d), labels (N,), inertia). `n_init` runs,
    each k-means++ seeded on a seeded sample of `sample_size` rows (None = all); lowest inertia wins."""
    x = np.ascontiguousarray(x, np.float32)
    rng = np.random.RandomState(seed)
    m = len(x) if sample_size is None else min(sample_size, len(x))
    sample = x[np.sort(rng.choice(len(x), m, replace=False))]
    shard = LatentShard(np.arange(len(x)), np.zeros(len(x), np.int64), x)
    jobs = [KMeansJob(f"kmeans{r}", 0, k, sample, iters=iters, seed=seed + 1000003 * r) for r in range(n_init)]
    run_jobs(jobs, lambda batch: [shard.step(batch)])
    job = min(jobs, key=lambda j: j.inertia[-1])
    labels, dist = nearest(x, job.centroids)
    return job.centroids, labels, float(dist.astype(np.float64).sum())
