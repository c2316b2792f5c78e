"""AutoAttack sharded by example over Ray actors.

The examples are cut into fixed chunks by global index and chunk k is attacked with the seed
`chunk_seed(seed, k)`, so the result does not depend on how many actors share the work or which
actor runs which chunk: a sharded run equals an unsharded one. Actors pull chunks from a queue
(faster actors take more) and are spread over the cluster's nodes; a lost actor is restarted by Ray
(on any node with room) and its chunk retried, with the same seed, so the result is unchanged.
`local_autoattack` runs the same chunks with the same seeds one after another in this process, without
Ray (`rayrobust.evaluate(..., backend="local")`), and so gives the same result.

With a `store` (`rayrobust.evaluation.resume.ChunkStore`), chunks finished by an earlier, interrupted run
are read back instead of attacked, and each chunk is saved as soon as it returns.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..attacks.autoattack import StageCallback, autoattack_chunk, chunk_plan, chunk_seed
from ..hardware import ray_node_id
from ..raypool import run_pool

ChunkCallback = Callable[[List[Optional[str]]], None]  # a finished chunk's per-example outcome


class AutoAttackWorker:
    """Holds the model on its device and attacks chunks. Plain class; made an actor at the call site."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_kwargs: Dict, threads: Optional[int] = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.x, self.y = x, y
        self.kwargs = attack_kwargs

    def attack(self, chunk_index: int, start: int, stop: int, seed: int) -> tuple:
        import os

        return chunk_index, self.attack_chunk(chunk_index, start, stop, seed), os.getpid(), ray_node_id()

    def attack_chunk(self, chunk_index: int, start: int, stop: int, seed: int,
                     on_stage: Optional[StageCallback] = None) -> List[Optional[str]]:
        """Per-example outcome of chunk `chunk_index` (examples start..stop) of a run seeded with `seed`."""
        return autoattack_chunk(self.model, self.x[start:stop].to(self.device), self.y[start:stop].to(self.device),
                                seed=chunk_seed(seed, chunk_index), device=self.device, on_stage=on_stage,
                                **self.kwargs)

    def pid(self) -> int:
        import os

        return os.getpid()


def sharded_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    version: str = "standard",
    attacks: Optional[Sequence[str]] = None,
    seed: int = 0,
    chunk_size: int = 50,
    num_shards: int = 2,
    progress: Optional[Callable[[int, int], None]] = None,
    on_chunk: Optional[ChunkCallback] = None,
    store=None,
) -> Dict:
    """AutoAttack over `num_shards` Ray actors; returns {"broken_by": [...], "workers": {...}, "seconds": s}.
    progress(chunks done, chunks) and on_chunk(that chunk's broken_by) are called as each chunk returns.
    `store`: a ChunkStore; saved chunks are read back, the others attacked and saved as they return."""
    import ray

    plan = chunk_plan(len(x), chunk_size)
    broken: List[Optional[str]] = [None] * len(x)
    todo = _restore(plan, broken, store, on_chunk, progress)
    if not todo:
        return _result(broken, {}, {}, 0.0, 0, chunk_size, plan, store)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:  # one GPU per actor: never more actors than GPUs
        num_shards, per_actor = min(num_shards, gpus), {"num_gpus": 1}
    else:
        per_actor = {"num_cpus": 1}
    num_shards = max(1, min(num_shards, len(todo)))
    Worker = ray.remote(max_restarts=2, max_task_retries=2, scheduling_strategy="SPREAD", **per_actor)(AutoAttackWorker)
    kwargs = {"eps": eps, "norm": norm, "version": version, "attacks": list(attacks) if attacks else None}
    model_ref, x_ref, y_ref = ray.put(model.cpu()), ray.put(x.cpu()), ray.put(y.cpu())
    threads = None if "num_gpus" in per_actor else 1
    actors = [Worker.remote(model_ref, x_ref, y_ref, kwargs, threads) for _ in range(num_shards)]
    workers: Dict[str, int] = {}
    nodes: Dict[str, int] = {}
    t0 = time.perf_counter()
    done = [len(plan) - len(todo)]

    def returned(item, value) -> None:
        k, chunk_broken, pid, node = value
        s, e = plan[k]
        broken[s:e] = chunk_broken
        if store is not None:
            store.save(k, s, e, chunk_broken)
        workers[str(pid)] = workers.get(str(pid), 0) + (e - s)
        if node:
            nodes[node] = nodes.get(node, 0) + (e - s)
        done[0] += 1
        if on_chunk:
            on_chunk(chunk_broken)
        if progress:
            progress(done[0], len(plan))

    try:
        run_pool(actors, todo, submit=lambda actor, item: actor.attack.remote(item[0], *item[1], seed),
                 on_result=returned)
    finally:
        for actor in actors:
            ray.kill(actor)
    return _result(broken, workers, nodes, time.perf_counter() - t0, num_shards, chunk_size, plan, store)


def restore_chunks(plan, store, on_saved: Optional[Callable[[int, object], None]] = None) -> List[tuple]:
    """The (k, (start, stop)) of `plan` still to attack: those `store` (a ChunkStore, or None) does not hold.
    on_saved(k, result) is called for each chunk read back, in chunk order."""
    todo = []
    for k, (s, e) in enumerate(plan):
        saved = store.load(k, s, e) if store is not None else None
        if saved is None:
            todo.append((k, (s, e)))
        elif on_saved:
            on_saved(k, saved)
    return todo


def _restore(plan, broken: List[Optional[str]], store, on_chunk, progress) -> List[tuple]:
    """Fill `broken` with the chunks `store` holds (reported like finished chunks); the chunks still to attack."""
    def saved(k, result):
        s, e = plan[k]
        broken[s:e] = result
        if on_chunk:
            on_chunk(result)

    todo = restore_chunks(plan, store, saved)
    if progress and len(todo) < len(plan):
        progress(len(plan) - len(todo), len(plan))
    return todo


def _result(broken, workers, nodes, seconds, num_shards, chunk_size, plan, store) -> Dict:
    out = {"broken_by": broken, "workers": workers, "nodes": nodes, "seconds": seconds,
           "num_shards": num_shards, "chunk_size": chunk_size}
    if store is not None:
        out["chunks"] = store.counts(len(plan))
    return out


def local_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    version: str = "standard",
    attacks: Optional[Sequence[str]] = None,
    seed: int = 0,
    chunk_size: int = 50,
    progress: Optional[Callable[[int, int], None]] = None,
    on_chunk: Optional[ChunkCallback] = None,
    on_stage: Optional[StageCallback] = None,
    store=None,
) -> Dict:
    """`sharded_autoattack` in this process, without Ray: the same chunks with the same seeds, one after another
    on this process's device and torch threads. x (N,C,H,W) in [0,1], y (N,); returns the same dict (one worker).
    on_stage(stage, robust left, chunk size) also reports the running chunk's attack stages."""
    import os

    plan = chunk_plan(len(x), chunk_size)
    kwargs = {"eps": eps, "norm": norm, "version": version, "attacks": list(attacks) if attacks else None}
    broken: List[Optional[str]] = [None] * len(x)
    todo = _restore(plan, broken, store, on_chunk, progress)
    worker = AutoAttackWorker(model, x.cpu(), y.cpu(), kwargs) if todo else None
    t0 = time.perf_counter()
    done = len(plan) - len(todo)
    for k, (s, e) in todo:
        broken[s:e] = worker.attack_chunk(k, s, e, seed, on_stage)
        if store is not None:
            store.save(k, s, e, broken[s:e])
        if on_chunk:
            on_chunk(broken[s:e])
        done += 1
        if progress:
            progress(done, len(plan))
    workers = {str(os.getpid()): sum(e - s for _, (s, e) in todo)} if todo else {}
    return _result(broken, workers, {}, time.perf_counter() - t0, 1, chunk_size, plan, store)
