"""rayrobust.raypool.run_pool: every item once, at most one item per worker at a time, errors propagate."""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.ray


def test_pool_runs_every_item_once_and_never_more_than_its_width(ray_cluster):
    import ray

    from rayrobust.raypool import run_pool

    @ray.remote(num_cpus=0.1)
    def work(item):
        start = time.time()
        time.sleep(0.2)
        return item * 2, start, time.time()

    seen, spans = {}, []

    def returned(item, value):
        assert item not in seen
        seen[item] = value[0]
        spans.append(value[1:])

    run_pool(range(2), range(7), submit=lambda _slot, item: work.remote(item), on_result=returned)
    assert seen == {i: 2 * i for i in range(7)}
    # at any task's start, at most one other task is running: 2 slots
    for s, _ in spans:
        assert sum(1 for s2, e2 in spans if s2 <= s < e2) <= 2


def test_pool_propagates_a_failed_item(ray_cluster):
    import ray

    from rayrobust.raypool import run_pool

    @ray.remote(num_cpus=0.1, max_retries=0)
    def work(item):
        if item == 3:
            raise ValueError("bad item 3")
        return item

    with pytest.raises(ValueError, match="bad item 3"):
        run_pool(range(2), range(5), submit=lambda _slot, item: work.remote(item), on_result=lambda i, v: None)
