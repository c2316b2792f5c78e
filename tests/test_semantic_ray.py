"""SRD semantic stages on the local 2-CPU Ray cluster: Ray Data extraction, sharded clustering, dictionaries."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayrobust.semantic.cluster_ray import cluster_distributed, run_cluster
from rayrobust.semantic.clustering import cluster_latents, load_clusters
from rayrobust.semantic.dictionaries import DictionaryParams, learn_cluster_dictionary, select_members
from rayrobust.semantic.dictionaries_ray import run_dictionaries
from rayrobust.semantic.errors import ArtifactMismatchError, LatentError
from rayrobust.semantic.extract import extract_latents, read_latents, run_extract
from rayrobust.semantic.purify import load_purifier

pytestmark = pytest.mark.ray

CLUSTER_KW = dict(k_max=3, threshold=0.2, iters=20, sample_size=300, seed=4)


@pytest.fixture(scope="module")
def extracted(ray_cluster, digits, digits_model, tmp_path_factory):
    train, _ = digits
    out = tmp_path_factory.mktemp("semantic")
    manifest = run_extract(digits_model, train, out, num_actors=2, batch_size=64, verbose=False)
    return out, manifest


def test_ray_data_extraction_equals_core(extracted, digits, digits_model):
    out, manifest = extracted
    train, _ = digits
    index, labels, latents = read_latents(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors' thread count
    try:
        ref = extract_latents(digits_model, train.x, 64)  # (N, 100)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(index, np.arange(len(train))) and np.array_equal(labels, train.y.numpy())
    assert latents.shape == ref.shape == (len(train), 100)
    assert np.abs(latents - ref).max() <= 1e-5
    # the Parquet schema as specified, in every shard
    for shard in manifest["shards"]:
        schema = pq.read_schema(out / "latents" / shard["file"])
        assert schema.field("index").type == pa.int64() and schema.field("label").type == pa.int64()
        assert schema.field("latent").type == pa.list_(pa.float32(), 100)
        assert schema.names == ["index", "label", "latent", "node", "worker"]  # + which node/actor made each row
    assert manifest["n"] == len(train) and manifest["dim"] == 100 and len(manifest["shards"]) >= 2
    assert sum(manifest["nodes"].values()) == len(train)
    assert len(manifest["workers"]) == 2  # both pool actors did work
    assert manifest["source"]["kind"] == "module" and len(manifest["source"]["sha256"]) == 64
    assert manifest["timings"]["images_per_s"] > 0


def test_extraction_reuses_and_refuses_other_inputs(extracted, digits, digits_model):
    out, manifest = extracted
    train, _ = digits
    again = run_extract(digits_model, train, out, verbose=False)
    assert again["provenance"]["created"] == manifest["provenance"]["created"]  # reused, not recomputed
    before = {p.name: p.stat().st_mtime_ns for p in (out / "latents").iterdir()}
    other = type(digits_model)(num_classes=10, in_channels=1, input_size=8, mean=train.mean, std=train.std)
    with pytest.raises(ArtifactMismatchError, match="source_sha256"):
        run_extract(other, train, out, verbose=False)
    with pytest.raises(ArtifactMismatchError, match="n: on disk"):
        run_extract(digits_model, train.take(100), out, verbose=False)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "latents").iterdir()} == before  # untouched


def test_extraction_overwrite_replaces(ray_cluster, digits, digits_model, tmp_path):
    train, _ = digits
    run_extract(digits_model, train.take(200), tmp_path, num_actors=1, batch_size=50, verbose=False)
    new = run_extract(digits_model, train.take(300), tmp_path, num_actors=1, batch_size=50, overwrite=True,
                      verbose=False)
    assert new["n"] == 300 and len(read_latents(tmp_path)[0]) == 300


def test_distributed_clustering_equals_single_process(extracted):
    out, _ = extracted
    index, labels, latents = read_latents(out)
    single = cluster_latents(index, labels, latents, **CLUSTER_KW)
    dist, info = cluster_distributed(out, num_shards=2, **CLUSTER_KW)  # each actor loads its Parquet files
    assert len(info["actors"]) == 2 and sum(a["rows"] for a in info["actors"]) == len(index)
    assert dist.k_per_class == single.k_per_class and dist.iterations == single.iterations
    assert np.array_equal(dist.assignment, single.assignment) and np.array_equal(dist.index, single.index)
    np.testing.assert_allclose(dist.centroids, single.centroids, atol=1e-6)
    np.testing.assert_allclose(dist.variances, single.variances, rtol=1e-5)
    for c in single.scores:
        assert dist.scores[c] == pytest.approx(single.scores[c])
    assert 1 < len(single.centroids) <= 30


def test_cluster_stage_writes_reuses_and_protects_artifacts(extracted):
    out, _ = extracted
    summary = run_cluster(out, out, num_shards=2, verbose=False, **_stage_kw())
    files = {p.name for p in (out / "clusters").iterdir()}
    assert {"clusters.json", "centroids.npy", "cluster_means.npy", "cluster_vars.npy", "cluster_class.npy",
            "assignments.npz", "manifest.json"} <= files
    loaded = load_clusters(out / "clusters")
    assert loaded["centroids"].shape == (summary["num_clusters"], 100)
    assert sum(map(int, summary["k_per_class"].values())) == summary["num_clusters"]
    assert summary["silhouette_threshold"] == 0.2 and summary["seed"] == 4
    assert json.loads((out / "clusters" / "clusters.json").read_text())["source_latents"]["n"] == len(loaded["index"])
    again = run_cluster(out, out, num_shards=2, verbose=False, **_stage_kw())
    assert again["provenance"]["created"] == summary["provenance"]["created"]
    with pytest.raises(ArtifactMismatchError, match="k_max"):
        run_cluster(out, out, num_shards=2, verbose=False, **{**_stage_kw(), "k_max": 2})
    with pytest.raises(LatentError, match="dimension 100 .* 256"):
        run_cluster(out, out, expected_dim=256, verbose=False, **_stage_kw())
    with pytest.raises(LatentError, match="too few latents .* each class needs >= 201"):
        run_cluster(out, out, overwrite=True, verbose=False, **{**_stage_kw(), "k_max": 200})
    assert load_clusters(out / "clusters")["summary"]["provenance"]["created"] == summary["provenance"]["created"]


def _stage_kw():
    kw = dict(CLUSTER_KW)
    return {"k_max": kw["k_max"], "threshold": kw["threshold"], "iters": kw["iters"],
            "sample_size": kw["sample_size"], "seed": kw["seed"]}


def test_dictionaries_on_actors_equal_core_and_feed_the_purifier(extracted, digits, digits_model):
    out, _ = extracted
    train, test = digits
    run_cluster(out, out, num_shards=2, verbose=False, **_stage_kw())
    params = DictionaryParams(n_atoms=16, max_images_per_cluster=60, max_patches_per_cluster=500, dict_iters=4)
    manifest = run_dictionaries(train, out, out, params, num_actors=2, verbose=False)
    cl = load_clusters(out / "clusters")
    assert manifest["num_clusters"] == len(cl["centroids"]) == len(list((out / "dictionaries").glob("cluster_*.npy")))
    k = 1
    members = select_members(cl["index"], cl["assignment"], k, params.max_images_per_cluster, params.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref, _ = learn_cluster_dictionary(train.x[members], params, k)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(np.load(out / "dictionaries" / "cluster_001.npy"), ref, atol=1e-5)
    with pytest.raises(ArtifactMismatchError, match="not the one the latents"):
        run_dictionaries(test, out, out, params, verbose=False)
    purifier = load_purifier(out, digits_model)
    x = test.x[:8]
    with torch.no_grad():
        assert purifier(x).shape == x.shape


def test_semantic_chain_in_object_storage_reads_images_on_the_workers(extracted, digits, digits_model, s3_server):
    """extract -> cluster -> dictionaries -> purifier with every artifact in a bucket and the images loaded by
    the workers from their own copy of the dataset: the same artifacts as the local in-memory chain."""
    from rayrobust.location import Location
    from rayrobust.semantic.source import ImageSource

    out, local = extracted
    train, test = digits
    uri = s3_server.make_bucket("semantic-chain") + "/run/semantic"
    params = DictionaryParams(n_atoms=16, max_images_per_cluster=60, max_patches_per_cluster=500, dict_iters=4)
    manifest = run_extract(digits_model, ImageSource("digits"), uri, num_actors=2, batch_size=64, verbose=False)
    assert manifest["reuse_key"] == local["reuse_key"]  # same weights, same data (content hash from a worker)
    assert manifest["data"]["name"] == "digits" and sum(manifest["nodes"].values()) == len(train)
    for got, want in zip(read_latents(uri), read_latents(out)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    s3_summary = run_cluster(uri, uri, num_shards=2, verbose=False, **_stage_kw())
    run_cluster(out, out, num_shards=2, verbose=False, **_stage_kw())
    np.testing.assert_allclose(load_clusters(f"{uri}/clusters")["centroids"], load_clusters(out / "clusters")["centroids"],
                               atol=1e-5)
    assert s3_summary["source_latents"]["dir"] == f"{uri}/latents"
    run_dictionaries(ImageSource("digits"), uri, uri, params, num_actors=2, verbose=False)
    run_dictionaries(train, out, out, params, num_actors=2, verbose=False)
    for k in range(s3_summary["num_clusters"]):
        name = f"cluster_{k:03d}.npy"
        np.testing.assert_allclose(np.load(io.BytesIO(Location(f"{uri}/dictionaries/{name}").read_bytes())),
                                   np.load(out / "dictionaries" / name), atol=1e-5)
    keys = s3_server.keys("semantic-chain")
    assert "run/semantic/latents/manifest.json" in keys and "run/semantic/dictionaries/manifest.json" in keys
    assert not [k for k in keys if ".tmp" in k]  # staging directories are gone
    with torch.no_grad():
        np.testing.assert_allclose(load_purifier(uri, digits_model)(test.x[:8]), load_purifier(out, digits_model)(test.x[:8]),
                                   atol=1e-5)


def test_extraction_streams_a_parquet_dataset_from_object_storage(extracted, digits, s3_server, digits_model):
    """data.name=parquet on a bucket: the extraction actors read the Parquet rows themselves (Ray Data), and the
    latents equal those of the in-memory dataset."""
    from rayrobust.config import load_config
    from rayrobust.data_ray import export_parquet
    from rayrobust.semantic.source import ImageSource

    out, _ = extracted
    root = s3_server.make_bucket("stream-extract") + "/digits"
    export_parquet({"name": "digits"}, root, rows_per_file=500, verbose=False)
    cfg = load_config(None, ["data.name=parquet", f"data.root={root}"])
    source = ImageSource.from_config(cfg.data, cfg.semantic)
    assert source.stream and source.name == "parquet"
    manifest = run_extract(digits_model, source, f"{root}-run/semantic", num_actors=2, batch_size=64, verbose=False)
    assert manifest["n"] == len(digits[0]) and manifest["data"]["stream"]
    for got, want in zip(read_latents(f"{root}-run/semantic"), read_latents(out)):
        np.testing.assert_allclose(got, want, atol=1e-5)
