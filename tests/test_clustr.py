"""ClusTR (docs/methods.md §2): Magnet loss, per-epoch clusters, smooth cluster logits, QTRADES, and the
reconstructed ℓ2 certificate (Lipschitz bound, certified radii, never broken by an attack)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from conftest import loss_before_after, tiny_config
from rayrobust.certify import (CertificateError, certificate_attack, certify, certify_checkpoint, latent_radii,
                               layer_bound, lipschitz_bound, operator_norm)
from rayrobust.errors import ConfigError
from rayrobust.methods import create_method, method_kwargs
from rayrobust.methods.clustr import ClusterLogits
from rayrobust.models import create_model
from rayrobust.train.loop import Split, make_optimizer, train_epoch


def _model(train, seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_channels=1, input_size=8, mean=train.mean, std=train.std)


def _train_clustr(train, name="clustr", epochs=5, seed=0):
    """A small_cnn trained with ClusTR on digits the way the worker does it (clusters refreshed per epoch)."""
    model = _model(train, seed)
    method = create_method(name, num_classes=10, seed=seed)
    opt = make_optimizer(model, 0.05, 0.9, 5e-4)
    data = Split(train.x, train.y, train.x[:0], train.y[:0])
    method.begin_epoch(model, train.x, train.y, 0)
    for e in range(epochs):
        train_epoch(model, method, opt, data, epoch=e, epochs=epochs, batch_size=64, lr=0.05, seed=seed)
        method.begin_epoch(model, train.x, train.y, e + 1)
    return model.eval(), method


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    return _train_clustr(digits[0])


# --------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("key,value", [("k", 0), ("k", 2.5), ("alpha", -1.0), ("weight", -0.5)])
def test_bad_values_are_config_errors(tmp_path, key, value):
    name = "clustr_qtrades"
    with pytest.raises(ConfigError, match=rf"^train.method_args.{name}.{key}={value!r}.* must be|"
                                          rf"^config key 'train.method_args.{name}.{key}': cannot read"):
        tiny_config(tmp_path, train={"method_args": {name: {key: value}}})
    with pytest.raises(ConfigError, match=f"train.method_args.{name}.{key}"):
        create_method(name, **{key: value})


def test_earlier_flat_keys_still_reach_the_settings(tmp_path):
    """A config or checkpoint of an earlier version (train.clustr_k, ...) reads into train.method_args."""
    cfg = tiny_config(tmp_path, train={"clustr_k": 3, "qtrades_weight": 4.0})
    assert cfg.train.method_args == {"clustr": {"k": 3}, "clustr_qtrades": {"k": 3, "weight": 4.0}}
    method = create_method("clustr_qtrades", num_classes=10, **method_kwargs(cfg.for_method("clustr_qtrades").train))
    assert (method.k, method.weight) == (3, 4.0)


def test_no_clusters_and_too_few_images_are_clear_errors(digits, one_thread):
    train, _ = digits
    model = _model(train)
    method = create_method("clustr", num_classes=10, k=2)
    with pytest.raises(ConfigError, match="begin_epoch"):
        method.decision(model)
    big = create_method("clustr", num_classes=10, k=500)
    with pytest.raises(ConfigError, match=r"fewer than k=500 clusters per class; lower train.method_args.clustr.k"):
        big.begin_epoch(model, train.x, train.y, 0)


# --------------------------------------------------------------------------------------- loss


def _reference_magnet(r, y, centroids, cluster_class, alpha):
    """The Magnet loss of docs/methods.md §2 written out per example, in float64."""
    r, centroids = r.double(), centroids.double()
    n = len(r)
    assign = []
    for i in range(n):
        own = [k for k in range(len(centroids)) if cluster_class[k] == y[i]]
        assign.append(min(own, key=lambda k: (r[i] - centroids[k]).pow(2).sum().item()))
    mu = []
    for k in range(len(centroids)):
        members = [i for i in range(n) if assign[i] == k]
        mu.append(r[members].mean(0) if members else centroids[k])
    sigma2 = sum((r[i] - mu[assign[i]]).pow(2).sum().item() for i in range(n)) / (n - 1)
    losses = []
    for i in range(n):
        d_own = (r[i] - mu[assign[i]]).pow(2).sum().item()
        num = math.exp(-d_own / (2 * sigma2) - alpha)
        den = sum(math.exp(-(r[i] - mu[k]).pow(2).sum().item() / (2 * sigma2))
                  for k in range(len(centroids)) if cluster_class[k] != y[i])
        losses.append(max(0.0, -math.log(num / den)))
    return sum(losses) / n


def test_magnet_loss_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, 3, generator=g)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2])
    centroids = torch.randn(6, 3, generator=g) * 2  # 3 classes x K=2; some clusters get no batch member
    method = create_method("clustr", alpha=1.0)
    method.load_state_dict({"centroids": centroids, "cluster_class": torch.arange(3).repeat_interleave(2),
                            "sigma2": torch.tensor(1.0)})
    loss, _ = method.magnet_loss(r, y)
    assert loss.item() == pytest.approx(_reference_magnet(r, y, centroids, [0, 0, 1, 1, 2, 2], 1.0), rel=1e-5)


@pytest.mark.parametrize("name", ["clustr", "clustr_qtrades"])
def test_loss_decreases_on_a_tiny_run(digits, one_thread, name):
    train, _ = digits
    model = _model(train)
    method = create_method(name, num_classes=10, seed=0, eps=0.1)
    method.begin_epoch(model, train.x, train.y, 0)  # the clusters the loss needs
    before, after = loss_before_after(method, model, train.x[:128], train.y[:128], steps=40)
    assert math.isfinite(before) and after < 0.5 * before, (before, after)


def test_qtrades_learns_instead_of_collapsing(one_thread):
    """With stored clusters the QTRADES term is driven to 0 by shrinking the latent space and
    training collapses to chance (measured: 0.20 test accuracy here); on the batch's clusters it
    cannot, and the model learns the classes (0.52)."""
    from rayrobust.data import load_dataset

    train = load_dataset("fashion_mnist", "train", limit=2000)
    test = load_dataset("fashion_mnist", "test", limit=1000)
    torch.manual_seed(0)
    model = create_model("small_cnn", mean=train.mean, std=train.std)
    method = create_method("clustr_qtrades", num_classes=10, seed=0, eps=0.1)
    opt = make_optimizer(model, 0.05, 0.9, 5e-4)
    data = Split(train.x, train.y, train.x[:0], train.y[:0])
    for e in range(3):
        method.begin_epoch(model, train.x, train.y, e)
        train_epoch(model, method, opt, data, epoch=e, epochs=3, batch_size=64, lr=0.05, seed=0)
    model.eval()
    with torch.no_grad():
        acc = (method.decision(model)(test.x).argmax(1) == test.y).float().mean().item()
    assert acc > 0.4, f"clustr_qtrades test accuracy {acc:.3f}: training collapsed (chance is 0.1)"


# --------------------------------------------------------------------------------------- clusters


def test_clusters_refresh_every_epoch_and_replay(digits, one_thread):
    train, _ = digits
    model = _model(train)
    a, b = create_method("clustr", num_classes=10, seed=3), create_method("clustr", num_classes=10, seed=3)
    a.begin_epoch(model, train.x, train.y, 0)
    b.begin_epoch(model, train.x, train.y, 0)
    assert torch.equal(a.centroids, b.centroids) and a.sigma2 == b.sigma2  # same seed, same weights: identical
    assert a.centroids.shape == (20, model.num_features)
    opt = make_optimizer(model, 0.05, 0.9, 5e-4)
    train_epoch(model, a, opt, Split(train.x, train.y, train.x[:0], train.y[:0]), epoch=0, epochs=2,
                batch_size=64, lr=0.05, seed=0)
    before = a.centroids.clone()
    a.begin_epoch(model, train.x, train.y, 1)
    assert (a.centroids - before).abs().max() > 1e-2  # refreshed from the trained weights
    # A resumed run: a new process with the weights at the start of epoch 1 computes the same clusters.
    resumed_model = _model(train, seed=1)
    resumed_model.load_state_dict(copy.deepcopy(model.state_dict()))
    c = create_method("clustr", num_classes=10, seed=3)
    c.begin_epoch(resumed_model, train.x, train.y, 1)
    assert torch.equal(c.centroids, a.centroids) and c.sigma2 == a.sigma2
    # state_dict round trip (what a checkpoint carries)
    d = create_method("clustr", num_classes=10)
    d.load_state_dict(a.state_dict())
    assert torch.equal(d.centroids, a.centroids) and d.sigma2 == a.sigma2 and d.k == 2


def test_cluster_logits_have_gradients_and_nearest_cluster_argmax(trained, digits):
    model, method = trained
    _, test = digits
    decision = method.decision(model)
    assert isinstance(decision, ClusterLogits)
    x = test.x[:100].clone().requires_grad_(True)
    logits = decision(x)
    assert logits.shape == (100, 10) and (logits <= 0).all()
    grad, = torch.autograd.grad(nn.functional.cross_entropy(logits, test.y[:100], reduction="sum"), x)
    assert (grad.flatten(1).abs().sum(1) > 0).all()  # every example has a non-zero input gradient
    with torch.no_grad():
        f = model.forward_features(test.x)
        nearest = torch.cdist(f.double(), method.centroids.double()).argmin(1)
        expected = method.cluster_class[nearest]
        assert torch.equal(decision(test.x).argmax(1), expected)
        acc = (expected == test.y).float().mean().item()
    assert acc > 0.9, acc


# --------------------------------------------------------------------------------------- Lipschitz bound


def test_power_iteration_matches_the_largest_singular_value():
    torch.manual_seed(0)
    lin = nn.Linear(30, 20)
    est = operator_norm(lambda v: nn.functional.linear(v, lin.weight.double()), (1, 30))
    svd = torch.linalg.svdvals(lin.weight.double())[0].item()
    assert est == pytest.approx(svd, rel=1e-6)
    bound, how = layer_bound(lin, (1, 30))  # with the bias, through the layer itself, x the safety factor
    assert bound == pytest.approx(1.01 * svd, rel=1e-6) and "power iteration" in how
    conv = nn.Conv2d(2, 3, 3, padding=1)
    jac = torch.autograd.functional.jacobian(lambda v: nn.functional.conv2d(v, conv.weight.double(), padding=1),
                                             torch.zeros(1, 2, 6, 6, dtype=torch.float64))  # explicit operator
    svd_conv = torch.linalg.svdvals(jac.reshape(3 * 36, 2 * 36))[0].item()
    assert layer_bound(conv, (1, 2, 6, 6))[0] == pytest.approx(1.01 * svd_conv, rel=1e-5)


def test_lipschitz_bound_is_an_upper_bound(trained, digits):
    model, _ = trained
    _, test = digits
    lip = lipschitz_bound(model)
    L = lip["bound"]
    assert L == pytest.approx(math.prod(layer["bound"] for layer in lip["layers"]), rel=1e-9)
    assert lip["layers"][0]["layer"] == "normalize" and lip["layers"][0]["bound"] == pytest.approx(1 / min(model.std.flatten().tolist()))
    g = torch.Generator().manual_seed(0)
    x = test.x[:200]
    with torch.no_grad():
        for scale in (1e-3, 1e-1, 1.0):
            delta = torch.randn(x.shape, generator=g) * scale
            ratio = (model.forward_features(x + delta) - model.forward_features(x)).norm(dim=1) / delta.flatten(1).norm(dim=1)
            assert (ratio <= L).all(), ratio.max()
    # the local Lipschitz constant (Jacobian spectral norm, by power iteration) at data points is below L too
    md = copy.deepcopy(model).double()
    for i in range(5):
        xi = x[i:i + 1].double()
        local = operator_norm(lambda v: torch.autograd.functional.jvp(md.forward_features, xi, v, create_graph=True)[1],
                              xi.shape)
        assert 0 < local <= L, (local, L)


def test_lipschitz_bound_refuses_what_it_cannot_bound():
    with pytest.raises(CertificateError, match="GELU"):
        layer_bound(nn.GELU(), (1, 4))
    with pytest.raises(CertificateError, match="needs a rayrobust model"):
        lipschitz_bound(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    assert layer_bound(nn.MaxPool2d(2), (1, 1, 8, 8))[0] == 1.0  # non-overlapping windows
    assert layer_bound(nn.MaxPool2d(3, stride=1), (1, 1, 8, 8))[0] == pytest.approx(3.0)  # sqrt(9)


# --------------------------------------------------------------------------------------- the certificate


def test_certificate_is_never_violated(trained, digits):
    from rayrobust.attacks import PGD

    model, method = trained
    _, test = digits
    res = certify(model, method, test.x, test.y, radii=(0.0, 0.01, 0.05), check_n=150, check_steps=100,
                  check_restarts=3)
    assert res["check"]["n"] == 150 and res["check"]["violations"] == 0 and res["flags"] == []
    assert res["certified_acc"]["0"] == pytest.approx(res["clean_acc"]) and res["clean_acc"] > 0.9
    assert res["certified_acc"]["0.01"] > 0.5  # not vacuous: most test digits are certified at l2 0.01
    assert res["certified_acc"]["0.05"] <= res["certified_acc"]["0.01"]
    r_latent, pred = latent_radii(model, method, test.x, test.y)
    assert torch.equal(r_latent > 0, pred == test.y)  # radius 0 exactly when misclassified
    r_input = r_latent / res["lipschitz"]["bound"]
    idx = (r_latent > 0).nonzero().squeeze(1)[:150]
    decision = method.decision(model)
    # The attack is real: 20x outside the certified radii it breaks many of the same points.
    far = certificate_attack(decision, test.x[idx], test.y[idx], 20 * r_input[idx].float(), steps=100, restarts=1)
    assert far.float().mean() > 0.1, far.float().mean()
    # An independent attack (the evaluation's L2 PGD, CE loss) at the smallest certified radius of the subset.
    eps = r_input[idx].min().item()
    x_adv = PGD(decision, eps=eps, norm="L2", steps=50, restarts=2, seed=1).perturb(test.x[idx], test.y[idx])
    assert (x_adv - test.x[idx]).flatten(1).norm(dim=1).max() <= eps * (1 + 1e-5)
    with torch.no_grad():
        assert (decision(x_adv).argmax(1) == test.y[idx]).all()


# --------------------------------------------------------------------------------------- Ray Train + CLI


@pytest.mark.ray
@pytest.mark.extended
def test_ray_train_checkpoint_evaluate_and_certify(ray_cluster, tmp_path, digits, capsys):
    from rayrobust.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from rayrobust.cli import main
    from rayrobust.evaluation import evaluate_checkpoint
    from rayrobust.train import fit

    cfg = tiny_config(tmp_path, train={"method": "clustr", "epochs": 2}, eval={"n_eval": 100, "n_autoattack": 10})
    result = fit(cfg, tmp_path / "run")
    payload = load_checkpoint(result.checkpoint)
    state = payload["method_state"]
    assert state["centroids"].shape == (20, 100) and state["sigma2"] > 0 and int(state["epoch"]) == 2
    assert torch.equal(state["cluster_class"], torch.arange(10).repeat_interleave(2))
    # The checkpoint's clusters are those of its own weights (recomputed here from the weights alone).
    fresh = create_method("clustr", num_classes=10, seed=cfg.train.seed)
    fresh.begin_epoch(model_from_checkpoint(result.checkpoint), *_train_split(cfg, digits), 2)
    assert torch.allclose(fresh.centroids, state["centroids"], atol=1e-5)

    res = evaluate_checkpoint(cfg, result.checkpoint, tmp_path / "eval.json")
    assert res["clean_acc"] > 0.5, res["clean_acc"]  # chance is 0.1
    assert res["autoattack"]["per_attack"] and res["autoattack_acc"] <= res["clean_acc"]
    cert = res["certificate"]
    assert cert["check"]["violations"] == 0 and "certificate_violated" not in res["flags"]
    assert cert["lipschitz"]["bound"] > 0 and set(cert["certified_acc"]) == {"0.1", "0.25", "0.5"}

    out = tmp_path / "cert.json"
    assert main(["certify", "--checkpoint", str(result.checkpoint), "--radii", "0.005,0.02", "--n", "40",
                 "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["n"] == 40 and set(written["certified_acc"]) == {"0.005", "0.02"}
    assert written["check"]["violations"] == 0 and "reconstructed" in written["certificate"]

    # A checkpoint of another method is refused with a clear message (and exit status 2 on the CLI).
    other = tmp_path / "standard.pt"
    payload["config"]["train"]["method"] = "standard"
    payload["method_state"] = {}
    save_checkpoint(other, {k: v for k, v in payload.items() if k != "format"})
    with pytest.raises(CertificateError, match="trained with method 'standard'"):
        certify_checkpoint(other, n=10)
    capsys.readouterr()
    assert main(["certify", "--checkpoint", str(other)]) == 2
    assert "rayrobust: error:" in capsys.readouterr().err
    assert main(["certify", "--checkpoint", str(result.checkpoint), "--radii", "abc"]) == 2


def _train_split(cfg, digits):
    """The training images the worker used (the same seeded train/validation split)."""
    from rayrobust.train.loop import train_val_split

    train, _ = digits
    split = train_val_split(train.x, train.y, cfg.data.val_size, seed=cfg.train.seed)
    return split.x_train, split.y_train


def test_distributed_wrapped_model_gives_the_same_loss_and_gradients(digits, one_thread):
    """Under DDP the latent is taken through DDP's forward (gradients all-reduced) and the unused head
    takes part with weight 0; loss and gradients equal the bare model's (gloo, one process)."""
    import socket

    import torch.distributed as dist

    train, _ = digits
    model = _model(train)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for name in ("clustr", "clustr_qtrades"):
            method = create_method(name, num_classes=10, seed=0)
            method.begin_epoch(model, train.x, train.y, 0)
            bare, wrapped = copy.deepcopy(model), copy.deepcopy(model)
            ddp = nn.parallel.DistributedDataParallel(wrapped)
            torch.manual_seed(1)
            loss_bare, _ = method.loss(bare, train.x[:64], train.y[:64])
            torch.manual_seed(1)
            loss_ddp, _ = method.loss(ddp, train.x[:64], train.y[:64])
            loss_bare.backward()
            loss_ddp.backward()
            assert loss_ddp.item() == pytest.approx(loss_bare.item(), rel=1e-6)
            assert all(p.grad is not None for p in wrapped.parameters())  # every parameter takes part
            for p, q in zip(bare.parameters(), wrapped.parameters()):
                expected = torch.zeros_like(q) if p.grad is None else p.grad  # the head: zero gradient
                assert torch.allclose(q.grad, expected, atol=1e-6)
    finally:
        dist.destroy_process_group()
