"""One work queue over Ray workers: each item goes to whichever worker finishes first.

AutoAttack (one chunk of images per item, on `AutoAttackWorker` actors), the adaptive attacks through a
purifier (one chunk per item, as Ray tasks in a fixed number of slots) and the dictionary learning (one
cluster per item, on `DictionaryWorker` actors) all run through `run_pool`.

Example:
    >>> run_pool(actors, chunks, submit=lambda actor, c: actor.attack.remote(*c), on_result=save)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence


def run_pool(workers: Sequence[Any], items: Iterable[Any], *, submit: Callable[[Any, Any], Any],
             on_result: Callable[[Any, Any], None]) -> None:
    """Give every worker an item, then the next item to whichever worker's result comes back first.

    `workers`: actor handles, or any tokens (e.g. `range(width)`) when `submit` starts Ray tasks, which bounds
    how many run at once. `submit(worker, item)` returns the ObjectRef of the item's result;
    `on_result(item, value)` is called in completion order, on this process, as each result arrives.
    A task that raises (after Ray's own retries) propagates its exception.
    """
    import ray

    queue = list(items)
    pending = {}
    for worker in workers:
        if not queue:
            break
        item = queue.pop(0)
        pending[submit(worker, item)] = (worker, item)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        worker, item = pending.pop(ready[0])
        on_result(item, ray.get(ready[0]))
        if queue:
            nxt = queue.pop(0)
            pending[submit(worker, nxt)] = (worker, nxt)


__all__ = ["run_pool"]
