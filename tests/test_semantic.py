"""SRD semantic pipeline cores, no Ray: adaptive K, k-means vs faiss, dictionaries, purifier, errors."""
import json
import warnings

import faiss
import numpy as np
import pytest
import torch

from rayrobust.errors import ConfigError
from rayrobust.semantic.artifacts import atomic_dir, check_reuse
from rayrobust.semantic.clustering import cluster_latents, silhouette
from rayrobust.semantic.config import SemanticConfig
from rayrobust.semantic.dictionaries import DictionaryParams, learn_cluster_dictionary, select_members
from rayrobust.semantic.errors import ArtifactMismatchError, LatentError
from rayrobust.semantic.extract import extract_latents
from rayrobust.semantic.kmeans import kmeans, nearest
from rayrobust.semantic.patches import fold, patches, split_frequencies
from rayrobust.semantic.purify import PurifiedClassifier, Purifier, purify_batches
from rayrobust.semantic.sparse import fista, objective, relative_error

from conftest import train_plain

PARAMS = DictionaryParams(max_images_per_cluster=150, max_patches_per_cluster=3000, dict_iters=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n_classes=20, d=32, per_mode=200, sep=10.0, seed=0):
    """Per class a mixture of m = 1..5 (cycling) unit Gaussians in d dims with centres ~sep apart
    (two points of one mode are ~sqrt(2d) = 8 apart for d=32)."""
    rng = np.random.RandomState(seed)
    xs, ys, modes = [], [], []
    for c in range(n_classes):
        m = c % 5 + 1
        centres = rng.randn(m, d) * sep / np.sqrt(2 * d)  # (m, d): pairwise distance ~ sep
        for j in range(m):
            xs.append(centres[j] + rng.randn(per_mode, d))
            ys += [c] * per_mode
        modes.append(m)
    x = np.concatenate(xs).astype(np.float32)
    return np.arange(len(x)), np.array(ys), x, modes


# --- adaptive clustering ------------------------------------------------------------------------
def test_adaptive_k_recovers_planted_modes():
    index, labels, x, modes = planted()
    res = cluster_latents(index, labels, x, k_max=5, threshold=0.2, seed=0)
    right = [res.k_per_class[c] == m for c, m in enumerate(modes)]
    assert np.mean(right) >= 0.9, (res.k_per_class, modes)
    assert res.k_per_class[0] == 1 and max(res.scores[0].values()) < 0.2  # one mode: no K>=2 passes
    assert len(res.centroids) == sum(res.k_per_class.values()) == len(res.means) == len(res.cluster_class)
    assert res.counts.sum() == len(x) and np.array_equal(np.sort(res.index), index)
    assert (res.variances >= 1e-4).all()
    # each row's cluster belongs to its own class
    assert np.array_equal(res.cluster_class[res.assignment], labels[np.argsort(index)])


def test_sharded_core_equals_one_shard_for_the_same_seed():
    index, labels, x, _ = planted(n_classes=5, per_mode=120)
    perm = np.random.RandomState(1).permutation(len(x))
    one = cluster_latents(index, labels, x, k_max=4, threshold=0.2, seed=5)
    three = cluster_latents(index[perm], labels[perm], x[perm], k_max=4, threshold=0.2, seed=5, num_shards=3)
    assert one.k_per_class == three.k_per_class and one.iterations == three.iterations
    assert np.array_equal(one.assignment, three.assignment)
    np.testing.assert_allclose(one.centroids, three.centroids, atol=1e-6)
    np.testing.assert_allclose(one.variances, three.variances, rtol=1e-5)


def test_kmeans_inertia_matches_faiss_kmeans():
    _, _, x, _ = planted(n_classes=5, d=48, per_mode=400, sep=4.0, seed=3)  # 6000 x 48, 15 overlapping modes
    for k in (4, 10):
        ours, _, inertia = kmeans(x, k, iters=25, seed=0)
        km = faiss.Kmeans(x.shape[1], k, niter=25, seed=1234)
        km.train(x)
        ref = float(nearest(x, km.centroids)[1].astype(np.float64).sum())
        assert abs(inertia - ref) / ref <= 0.01, (k, inertia, ref)


def test_silhouette_equals_sklearn():
    from sklearn.metrics import silhouette_score

    rng = np.random.RandomState(0)
    x, lab = rng.randn(300, 6), rng.randint(0, 4, 300)
    lab[0] = 7  # a singleton cluster scores 0
    assert silhouette(x, lab) == pytest.approx(silhouette_score(x, lab), abs=1e-9)
    assert silhouette(x, np.zeros(300, int)) == -1.0


# --- patches and sparse coding -------------------------------------------------------------------
def test_frequency_split_and_patch_roundtrip():
    x = torch.rand(3, 2, 28, 28)
    low, high = split_frequencies(x, 1.0)
    assert torch.allclose(low + high, x) and high.abs().mean() > 0.05
    flat = torch.full((1, 1, 28, 28), 0.3)
    assert split_frequencies(flat, 1.0)[1].abs().max() < 1e-6  # a constant image has no high frequencies
    for p, s, size in ((4, 2, 28), (4, 4, 28), (5, 2, 32), (4, 3, 8)):
        y = torch.rand(2, 3, size, size)
        assert torch.allclose(fold(patches(y, p, s), (3, size, size), p, s), y, atol=1e-6)


def test_fista_reaches_the_lasso_optimum():
    from sklearn.decomposition import sparse_encode

    g = torch.Generator().manual_seed(0)
    D = torch.randn(24, 16, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    X = torch.randn(200, 16, generator=g) * 0.3
    lam = 0.05
    A = fista(X, D, lam, 500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coordinate descent's own convergence notes
        ref = sparse_encode(X.double().numpy(), D.double().numpy(), algorithm="lasso_cd", alpha=lam, max_iter=5000)
    ours, best = objective(X, A, D, lam), objective(X, torch.from_numpy(ref).float(), D, lam)
    assert ours <= best * 1.001
    assert (A == 0).float().mean() > 0.3  # sparse codes


# --- Fashion-MNIST: a quick baseline, its clusters, dictionaries and the purifier ------------------
@pytest.fixture(scope="module")
def srd():
    """small_cnn trained ~15 s on 3000 Fashion-MNIST images; its clusters and per-cluster dictionaries."""
    from rayrobust.data import load_dataset
    from rayrobust.models import create_model

    train = load_dataset("fashion_mnist", "train", limit=3000)
    test = load_dataset("fashion_mnist", "test", limit=1000)
    torch.manual_seed(0)
    model = train_plain(create_model("small_cnn", mean=train.mean, std=train.std), train.x, train.y, epochs=6)
    z = extract_latents(model, train.x, 256)  # (3000, 100)
    clusters = cluster_latents(np.arange(len(z)), train.y.numpy(), z, k_max=3, threshold=0.2, seed=0,
                               sample_size=500)
    dicts = np.stack([learn_cluster_dictionary(
        train.x[select_members(clusters.index, clusters.assignment, k, PARAMS.max_images_per_cluster, 0)],
        PARAMS, k)[0] for k in range(len(clusters.centroids))])  # (K, atoms, 16)
    purifier = Purifier(model, clusters.means, clusters.variances, dicts, patch_size=PARAMS.patch_size,
                        patch_stride=PARAMS.patch_stride, sparsity=PARAMS.sparsity, fista_iters=PARAMS.fista_iters,
                        blur_sigma=PARAMS.blur_sigma, cluster_class=clusters.cluster_class).eval()
    return {"model": model, "train": train, "test": test, "clusters": clusters, "dicts": dicts, "purifier": purifier}


def test_dictionaries_carry_cluster_semantics(srd):
    """Held-out images reconstruct better (high-frequency error) with their cluster's dictionary."""
    test, purifier, dicts = srd["test"], srd["purifier"], torch.from_numpy(srd["dicts"])
    with torch.no_grad():
        k_hat = purifier.nearest_cluster(test.x)
    _, high = split_frequencies(test.x, PARAMS.blur_sigma)
    own, other, wins = [], [], 0
    groups = [k for k in range(len(dicts)) if (k_hat == k).sum() >= 15]
    assert len(groups) >= 8
    gen = torch.Generator().manual_seed(0)
    for k in groups:
        X = patches(high[k_hat == k], PARAMS.patch_size, PARAMS.patch_stride).reshape(-1, 16)
        X = X[X.norm(dim=1) > 1e-4]  # non-flat patches,
        X = X[torch.randperm(len(X), generator=gen)[:600]]  # 600 of them per cluster
        err = [relative_error(X, fista(X, D, PARAMS.sparsity, PARAMS.fista_iters) @ D) for D in dicts]
        own.append(err[k])
        other.append(np.mean([e for j, e in enumerate(err) if j != k]))
        wins += int(np.argsort(err).tolist().index(k) < len(dicts) // 4)  # own dictionary in the best quarter
    assert np.mean(own) < 0.92 * np.mean(other), (own, other)  # measured: 0.137 vs 0.159
    assert wins >= 0.75 * len(groups)


def test_purifier_is_deterministic_shape_preserving_and_differentiable(srd):
    purifier, model = srd["purifier"], srd["model"]
    x = srd["test"].x[:16]
    with torch.no_grad():
        a, b = purifier(x), purifier(x)
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert 0.003 < (a - x).abs().mean() < 0.05  # it does change the image, but not wholesale
    xg = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(PurifiedClassifier(purifier, model)(xg), srd["test"].y[:16])
    loss.backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0 and torch.isfinite(xg.grad).all()


def test_purification_keeps_clean_accuracy(srd):
    model, test = srd["model"], srd["test"]
    purified, _ = purify_batches(srd["purifier"], test.x)
    with torch.no_grad():
        clean = (model(test.x).argmax(1) == test.y).float().mean().item()
        after = (model(purified).argmax(1) == test.y).float().mean().item()
    assert clean > 0.78
    assert abs(clean - after) <= 0.02, (clean, after)


# --- errors users can cause ------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(srd):
    index, labels, x, _ = planted(n_classes=3, per_mode=30)
    with pytest.raises(ConfigError, match="k_max=0"):
        cluster_latents(index, labels, x, k_max=0, threshold=0.2)
    with pytest.raises(ConfigError, match="semantic.k_max=0"):
        SemanticConfig(k_max=0)
    with pytest.raises(ConfigError, match="patch_stride"):
        SemanticConfig(patch_size=4, patch_stride=5)
    small = labels != 2
    small[np.flatnonzero(labels == 2)[:4]] = True  # class 2 keeps only 4 latents
    with pytest.raises(LatentError, match="class 2 has 4"):
        cluster_latents(index[small], labels[small], x[small], k_max=5, threshold=0.2)
    bad = x.copy()
    bad[5, 3] = np.nan
    with pytest.raises(LatentError, match="NaN"):
        cluster_latents(index, labels, bad, k_max=2, threshold=0.2)
    cl = srd["clusters"]
    from rayrobust.models import create_model

    other = create_model("small_cnn_wide")  # 256-d latents; the clusters are 100-d
    with pytest.raises(LatentError, match="100-d latent space .* 256-d"):
        Purifier(other, cl.means, cl.variances, srd["dicts"], patch_size=4, patch_stride=2, sparsity=0.1,
                 fista_iters=5, blur_sigma=1.0)


def test_artifacts_are_atomic_and_refuse_other_inputs(tmp_path):
    dest = tmp_path / "clusters"
    with atomic_dir(dest) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"reuse_key": {"k_max": 3}}))
    assert check_reuse(dest, {"k_max": 3}, stage="clusters", overwrite=False)["reuse_key"] == {"k_max": 3}
    with pytest.raises(ArtifactMismatchError, match="k_max: on disk 3, now 5"):
        check_reuse(dest, {"k_max": 5}, stage="clusters", overwrite=False)
    assert check_reuse(dest, {"k_max": 5}, stage="clusters", overwrite=True) is None
    with pytest.raises(RuntimeError):  # a crash half-way leaves the old artifact untouched
        with atomic_dir(dest) as tmp:
            (tmp / "manifest.json").write_text("{}")
            raise RuntimeError("crash")
    assert json.loads((dest / "manifest.json").read_text()) == {"reuse_key": {"k_max": 3}}
    assert [p.name for p in tmp_path.iterdir()] == ["clusters"]  # no temporary left behind


def test_artifact_directories_commit_by_manifest_in_object_storage(s3_server):
    """In a bucket there is no rename: files are staged, the old manifest goes first, the new one last."""
    bucket = "atomic-dirs"

    def objects():  # the files (an S3 client's empty "dir/" markers are not files)
        return [k for k in s3_server.keys(bucket) if not k.endswith("/")]

    dest = s3_server.make_bucket(bucket) + "/run/clusters"
    with atomic_dir(dest) as tmp:
        (tmp / "a.npy").write_bytes(b"old")
        (tmp / "manifest.json").write_text(json.dumps({"reuse_key": {"k_max": 3}}))
    assert check_reuse(dest, {"k_max": 3}, stage="clusters", overwrite=False)["reuse_key"] == {"k_max": 3}
    with pytest.raises(RuntimeError):  # a crash half-way leaves the old artifact untouched
        with atomic_dir(dest) as tmp:
            (tmp / "b.npy").write_bytes(b"new")
            raise RuntimeError("crash")
    assert objects() == ["run/clusters/a.npy", "run/clusters/manifest.json"]
    with atomic_dir(dest) as tmp:  # an overwrite replaces the directory whole
        (tmp / "b.npy").write_bytes(b"new")
        (tmp / "manifest.json").write_text(json.dumps({"reuse_key": {"k_max": 5}}))
    assert objects() == ["run/clusters/b.npy", "run/clusters/manifest.json"]
    assert check_reuse(dest, {"k_max": 5}, stage="clusters", overwrite=False)["reuse_key"] == {"k_max": 5}
