"""Extraction and clustering across two Ray nodes (head + worker on loopback) equal the single-process results."""
import numpy as np
import pytest
import torch

from rayrobust.semantic.cluster_ray import run_cluster
from rayrobust.semantic.clustering import cluster_latents, load_clusters
from rayrobust.semantic.extract import extract_latents, read_latents, run_extract

pytestmark = [pytest.mark.multinode, pytest.mark.ray]

SLOT = "rayrobust_test_slot"  # one per node: an actor asking for it lands on a node of its own
CLUSTER_KW = dict(k_max=3, threshold=0.2, iters=20, sample_size=300, seed=7)


@pytest.fixture
def two_nodes():
    """A 2-node cluster (2 CPUs + one SLOT each); the session's local cluster is restored afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {SLOT: 1}})
    worker = cluster.add_node(num_cpus=2, resources={SLOT: 1})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield {"head": cluster.head_node.node_id, "worker": worker.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_up:  # the session-scoped `ray_cluster` fixture expects its local cluster back
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)


def test_extract_and_cluster_on_two_nodes_equal_single_process(two_nodes, digits, digits_model, tmp_path):
    train, _ = digits
    pin = {"resources": {SLOT: 1}}
    manifest = run_extract(digits_model, train, tmp_path, num_actors=2, batch_size=64, ray_remote_args=pin,
                           verbose=False)
    assert set(manifest["nodes"]) == {two_nodes["head"], two_nodes["worker"]}  # both nodes extracted
    assert sum(manifest["nodes"].values()) == len(train)

    index, labels, latents = read_latents(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = extract_latents(digits_model, train.x, 64)
    finally:
        torch.set_num_threads(threads)
    assert np.abs(latents - ref).max() <= 1e-5

    summary = run_cluster(tmp_path, tmp_path, num_shards=2, actor_options=pin, verbose=False, **{
        "k_max": CLUSTER_KW["k_max"], "threshold": CLUSTER_KW["threshold"], "iters": CLUSTER_KW["iters"],
        "sample_size": CLUSTER_KW["sample_size"], "seed": CLUSTER_KW["seed"]})
    assert set(summary["nodes"]) == {two_nodes["head"], two_nodes["worker"]}  # shards held on both nodes
    assert sum(summary["nodes"].values()) == len(train)

    single = cluster_latents(index, labels, latents, **CLUSTER_KW)
    got = load_clusters(tmp_path / "clusters")
    assert {int(c): k for c, k in summary["k_per_class"].items()} == single.k_per_class
    assert np.array_equal(got["index"], single.index) and np.array_equal(got["assignment"], single.assignment)
    np.testing.assert_allclose(got["centroids"], single.centroids, atol=1e-6)
    np.testing.assert_allclose(got["variances"], single.variances, rtol=1e-5)
