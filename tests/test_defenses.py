"""DRP and SPAT (docs/methods.md §3, §4): losses, decision functions, prototypes, weight maps, method state."""
import math

import pytest
import torch
import torch.nn.functional as F

from rayrobust.attacks.checks import check_softmax_output, check_zero_gradients
from rayrobust.checkpoint import load_checkpoint, save_checkpoint
from rayrobust.config import TrainConfig, config_from_dict
from rayrobust.errors import ConfigError
from rayrobust.methods import METHODS, create_method, method_kwargs
from rayrobust.methods.drp import PrototypeLogits, make_prototypes, pairwise_distances, simplex_distance
from rayrobust.methods.spat import fisher_ratio, fisher_weights, saliency_weights
from rayrobust.models import create_model

from conftest import loss_before_after, tiny_config

DEFENSES = [("drp", {}), ("drp_at", {}), ("spat", {"weights": "fisher"}), ("spat", {"weights": "saliency"})]


def _setup(name, opts, digits, seed=0):
    train, _ = digits
    method = create_method(name, num_classes=10, eps=0.1, steps=3, **opts)
    method.fit(train.x, train.y)
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=method.output_dim(10), input_size=8, mean=train.mean, std=train.std)
    return method, model


def test_registry_and_output_dims():
    assert {"drp", "drp_at", "spat"} <= set(METHODS.names())
    assert create_method("drp", num_classes=10).output_dim(10) == 100
    assert create_method("drp", num_classes=10, dim=16).output_dim(10) == 16
    assert create_method("spat").output_dim(10) == 10 and create_method("pgd_at").output_dim(10) == 10


def test_prototypes_deterministic_separated_and_reported():
    p, dmin = make_prototypes(10, 100, seed=0)
    q, dmin_q = make_prototypes(10, 100, seed=0)
    assert torch.equal(p, q) and dmin == dmin_q
    assert p.shape == (10, 100) and torch.allclose(p.norm(dim=1), torch.ones(10), atol=1e-5)
    assert dmin == pytest.approx(pairwise_distances(p).min().item(), abs=1e-6)
    # Better than orthogonal (√2, what random directions in 100-D give at best) and close to the
    # regular simplex √(20/9) ≈ 1.491, the largest possible minimum for 10 points on a sphere.
    assert math.sqrt(2) + 0.03 < dmin <= simplex_distance(10) + 1e-6
    other, _ = make_prototypes(10, 100, seed=1)
    assert not torch.allclose(p, other)
    method = create_method("drp", num_classes=10, seed=0)
    assert torch.equal(method.prototypes, p) and method.min_distance == dmin


def test_prototype_generation_leaves_global_rng_alone():
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    create_method("drp", num_classes=10)
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("name, opts", DEFENSES)
def test_each_defense_lowers_its_loss(name, opts, digits, one_thread):
    train, _ = digits
    method, model = _setup(name, opts, digits)
    first, last = loss_before_after(method, model, train.x[:256], train.y[:256])
    assert last < 0.8 * first
    assert model.training and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name, opts", DEFENSES)
def test_decision_is_attackable_logits(name, opts, digits, one_thread):
    _, test = digits
    method, model = _setup(name, opts, digits)
    model.eval()
    decision = method.decision(model)
    x, y = test.x[:64], test.y[:64]
    out = decision(x)
    assert out.shape == (64, 10)
    assert check_zero_gradients(decision, x, y).passed  # every example has a non-zero input gradient
    assert check_softmax_output(decision, x).passed
    assert not torch.allclose(out.sum(1), torch.ones(64), atol=1e-3)
    if name.startswith("drp"):
        assert isinstance(decision, PrototypeLogits)
        # the logits are the scaled dot products with the prototypes, not distances or probabilities
        expected = method.scale * F.normalize(model(x), dim=1) @ method.prototypes.t()
        assert torch.allclose(out, expected, atol=1e-5)
        assert out.min() < 0 and out.abs().max() <= method.scale + 1e-4
        # the nearest prototype is the arg-max logit
        dist = torch.cdist(F.normalize(model(x), dim=1), method.prototypes)
        assert torch.equal(out.argmax(1), dist.argmin(1))
    else:
        assert decision is model  # SPAT: the unmasked threat model


def test_drp_loss_matches_its_definition():
    method = create_method("drp", num_classes=4, dim=8, margin=0.3, beta=2.0)
    torch.manual_seed(0)
    out, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0])
    loss, logits = method.prototype_loss(out, y)
    z = F.normalize(out, dim=1)
    dist = torch.cdist(z, method.prototypes)
    expected = 0.0
    for i in range(5):
        d_true = dist[i, y[i]]
        hinge = sum(F.relu(0.3 - (dist[i, c] - d_true)) for c in range(4) if c != y[i])
        expected += d_true + 2.0 * hinge
    assert loss.item() == pytest.approx(expected.item() / 5, rel=1e-4)
    assert torch.allclose(logits, method.scale * z @ method.prototypes.t(), atol=1e-5)


def test_spat_fisher_map_budgets_shared_pixels(digits):
    train, _ = digits
    ratio = fisher_ratio(train.x, train.y).flatten()
    w = fisher_weights(train.x, train.y, w_min=0.2).flatten()
    assert w.shape == ratio.shape and w.min() >= 0.2 - 1e-6 and w.max() <= 1 + 1e-6
    assert w.min() == pytest.approx(0.2, abs=1e-5) and w.max() == pytest.approx(1.0, abs=1e-5)
    corr = torch.corrcoef(torch.stack([w, ratio]))[0, 1].item()
    assert corr < -0.9
    order = ratio.argsort()
    k = max(1, len(order) // 10)
    assert w[order[:k]].mean() > w[order[-k:]].mean() + 0.3  # lowest-F decile vs highest-F decile


def test_spat_attack_shapes_training_budget(digits, one_thread):
    train, _ = digits
    method, model = _setup("spat", {"weights": "fisher", "w_min": 0.1}, digits)
    w = method.state_dict()["weight"]
    assert w.shape == (1, *train.x.shape[1:])
    from rayrobust.methods.perturb import ce_objective, linf_pgd

    x, y = train.x[:128], train.y[:128]
    x_adv = linf_pgd(model.eval(), x, ce_objective(y), eps=0.1, step=0.05, steps=3, weight=w)
    delta = (x_adv - x).abs()
    assert delta.max() <= 0.1 + 1e-6  # the full eps-ball, unmasked at the projection
    low, high = w.flatten() > 0.9, w.flatten() < 0.3
    per_pixel = delta.flatten(1).mean(0)
    assert per_pixel[low].mean() > per_pixel[high].mean()


def test_spat_saliency_weights_in_range(digits_model, digits):
    _, test = digits
    w = saliency_weights(digits_model.eval(), test.x[:16], w_min=0.3)
    assert w.shape == test.x[:16].shape and w.min() >= 0.3 - 1e-6 and w.max() <= 1 + 1e-6


def test_spat_fisher_needs_fit():
    method = create_method("spat")
    model = create_model("small_cnn", input_size=8)
    with pytest.raises(ConfigError, match="fit"):
        method.loss(model, torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("margin", [0.0, -0.5])
def test_nonpositive_margin_is_a_clear_error(margin, tmp_path):
    with pytest.raises(ConfigError, match=r"^train.method_args.drp.margin=.* must be > 0"):
        create_method("drp", num_classes=10, margin=margin)
    with pytest.raises(ConfigError, match=r"^train.method_args.drp.margin=.* must be > 0"):
        tiny_config(tmp_path, train={"method": "drp", "method_args": {"drp": {"margin": margin}}})
    with pytest.raises(ConfigError, match=r"^train.method_args.drp.margin=.* must be > 0"):  # the earlier flat key
        tiny_config(tmp_path, train={"method": "drp", "repulsion_margin": margin})


@pytest.mark.parametrize("method, settings, match", [
    ("spat", {"weights": "pixels"}, r"^train.method_args.spat.weights='pixels' must be one of: fisher, saliency$"),
    ("spat", {"w_min": 0.0}, r"^train.method_args.spat.w_min=0.0 must be in \(0, 1\]"),
    ("spat", {"w_min": 1.5}, r"^train.method_args.spat.w_min=1.5 must be in \(0, 1\]"),
    ("drp", {"beta": -1}, r"^train.method_args.drp.beta=-1.0 must be >= 0"),
    ("drp", {"margn": 0.3}, r"^unknown config key 'train.method_args.drp.margn' \(did you mean 'margin'\?\); "
                            r"valid keys in train.method_args.drp: margin, beta, dim, scale$"),
    ("dpr", {"margin": 0.3}, r"^unknown config key 'train.method_args.dpr' \(did you mean 'drp'\?\)"),
    ("pgd_at", {"beta": 6}, r"^unknown config key 'train.method_args.pgd_at.beta'; valid keys in "
                             r"train.method_args.pgd_at: none: pgd_at has no settings of its own$"),
])
def test_bad_defense_options_rejected(method, settings, match):
    """A mistyped setting is an error that names it, the valid ones and the closest, never silently ignored."""
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"train": {"method_args": {method: settings}}})
    if method in METHODS.names():
        with pytest.raises(ConfigError, match=match):
            create_method(method, **settings)


def test_method_kwargs_give_the_method_its_own_settings_and_the_common_arguments():
    tc = TrainConfig(method="drp_at", attack_steps=4, eps=0.2,
                     method_args={"drp_at": {"margin": 0.3, "beta": 0.5}, "spat": {"w_min": 0.7}})
    kw = method_kwargs(tc)
    assert kw == {"seed": 0, "eps": 0.2, "steps": 4, "norm": "Linf", "attack_step": None,
                  "settings": {"margin": 0.3, "beta": 0.5}}
    assert method_kwargs(tc.__dict__) == kw  # a checkpoint's config dict gives the same options
    drp = create_method(tc.method, num_classes=10, **kw)
    assert (drp.margin, drp.beta, drp.eps, drp.steps) == (0.3, 0.5, 0.2, 4)
    spat = create_method("spat", **method_kwargs(TrainConfig(method="spat", method_args=tc.method_args)))
    assert spat.w_min == 0.7 and spat.eps == 0.1
    # a checkpoint written by an earlier version (flat keys) rebuilds the same method
    old = {**{k: v for k, v in tc.__dict__.items() if k != "method_args"}, "repulsion_margin": 0.3, "drp_beta": 0.5}
    assert method_kwargs(old) == kw


@pytest.mark.parametrize("path, methods", [("configs/drp.yaml", ["drp", "drp_at"]), ("configs/spat.yaml", ["spat"])])
def test_defense_configs_load(path, methods):
    from rayrobust.config import load_config

    cfg = load_config(path)
    assert cfg.methods == methods and cfg.data.name == "fashion_mnist" and cfg.model.name == "small_cnn"
    for name in methods:
        create_method(name, num_classes=10, **method_kwargs(cfg.train))


def test_method_state_checkpoint_roundtrip(tmp_path, digits):
    train, _ = digits
    method, model = _setup("drp", {"seed": 3}, digits)
    spat, _ = _setup("spat", {}, digits)
    path = tmp_path / "epoch_001.pt"
    save_checkpoint(path, {"model": model.state_dict(), "epoch": 1, "history": [], "config": {}, "model_meta": {},
                           "provenance": {}, "method_state": method.state_dict(), "spat_state": spat.state_dict()})
    payload = load_checkpoint(path)  # weights_only=True: plain tensors only
    restored = create_method("drp")  # no num_classes: nothing generated until the state arrives
    assert restored.prototypes is None
    restored.load_state_dict(payload["method_state"])
    assert torch.equal(restored.prototypes, method.prototypes)
    assert restored.min_distance == pytest.approx(method.min_distance)
    x = train.x[:8]
    model.eval()
    assert torch.equal(restored.decision(model)(x), method.decision(model)(x))
    spat2 = create_method("spat")
    spat2.load_state_dict(payload["spat_state"])
    assert torch.equal(spat2.weight, spat.weight)


def test_drp_without_prototypes_is_a_clear_error():
    with pytest.raises(ConfigError, match="no prototypes"):
        create_method("drp").decision(create_model("small_cnn", input_size=8))


@pytest.mark.ray
@pytest.mark.extended
def test_drp_on_ray_train_saves_prototypes_and_evaluates_the_decision(ray_cluster, tmp_path):
    from rayrobust.evaluation import evaluate_checkpoint
    from rayrobust.train import fit

    cfg = tiny_config(tmp_path, train={"method": "drp", "epochs": 2, "lr": 0.05},
                      eval={"n_eval": 100, "n_autoattack": 10, "num_shards": 1, "chunk_size": 10})
    result = fit(cfg, tmp_path / "drp")
    payload = load_checkpoint(result.checkpoint)
    assert payload["model_meta"]["num_classes"] == 100 and payload["model_meta"]["num_labels"] == 10
    expected, _ = make_prototypes(10, 100, seed=cfg.train.seed)
    assert torch.equal(payload["method_state"]["prototypes"], expected)
    assert result.metrics[-1]["val_clean_acc"] > 0.5  # validation goes through the decision function
    res = evaluate_checkpoint(cfg, result.checkpoint)
    assert res["method"] == "drp" and res["clean_acc"] > 0.5
    assert res["autoattack_acc"] is not None and res["autoattack_acc"] <= res["clean_acc"]
    names = {c["name"]: c["passed"] for c in res["checks"]}
    assert names["zero_gradients"] and names["softmax_output"]
