"""Recipes that compare with the literature: the CIFAR PGD-AT / TRADES / L2 configs, `train.norm` (L2 training),
`eval.autoattack_version` and `rayrobust.benchmark` (RobustBench's call)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from rayrobust.config import load_config
from rayrobust.errors import ConfigError
from rayrobust.methods import create_method, method_kwargs
from rayrobust.methods.perturb import ce_objective, train_pgd

REPO = Path(__file__).resolve().parents[1]


# --- the configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_configs_are_the_published_pgd_at_recipe(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    t = cfg.train
    assert cfg.model.name == "preact_resnet18" and t.method == "pgd_at" and t.norm == "Linf"
    assert t.eps == pytest.approx(8 / 255, abs=1e-6) and t.attack_steps == 10
    assert t.attack_step == pytest.approx(2 / 255, abs=1e-6)
    assert create_method("pgd_at", num_classes=10, **method_kwargs(t)).step == pytest.approx(2 / 255, abs=1e-6)
    assert (t.lr, t.momentum, t.nesterov, t.weight_decay, t.batch_size, t.epochs) == (0.1, 0.9, False, 5e-4, 128, 200)
    assert (t.lr_schedule, t.lr_milestones, t.lr_decay) == ("piecewise", [100, 150], 0.1)
    assert t.early_stopping and t.val_pgd_steps == 10 and cfg.data.val_size == 1000
    assert cfg.data.augment is True and cfg.data.augment_pad == 4 and cfg.data.augment_padding == "zeros"
    assert cfg.eval.norm == "Linf" and cfg.eval.eps == pytest.approx(8 / 255, abs=1e-6)
    assert cfg.eval.autoattack_version == "standard"
    text = (REPO / "configs" / f"{name}.yaml").read_text()
    assert "Rice" in text and "Overfitting in" in text  # the source is named in the file


def test_trades_and_l2_recipes():
    trades = load_config(REPO / "configs" / "cifar10_trades.yaml")
    assert trades.train.method == "trades" and trades.train.method_args == {"trades": {"beta": 6.0}} and trades.methods == ["trades"]
    assert trades.train.eps == pytest.approx(8 / 255, abs=1e-6) and trades.data.augment
    assert "Zhang" in (REPO / "configs" / "cifar10_trades.yaml").read_text()
    l2 = load_config(REPO / "configs" / "cifar10_l2.yaml")
    assert l2.train.norm == "L2" and l2.train.eps == 0.5 and l2.eval.norm == "L2" and l2.eval.eps == 0.5
    method = create_method("pgd_at", num_classes=10, **method_kwargs(l2.train))
    assert method.norm == "L2" and method.eps == 0.5


# --- train.norm and L2 budgets ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pgd_at", "trades", "fgsm_rs", "spat", "drp_at", "clustr_qtrades", "srd"])
def test_every_adversarial_method_trains_in_train_norm(name):
    cfg = load_config(overrides=["train.norm=L2", "train.eps=1.5", f"train.method={name}"])
    method = create_method(name, num_classes=10, **method_kwargs(cfg.train))
    assert method.adversarial and method.norm == "L2" and method.eps == 1.5


def test_l2_training_attack_stays_in_the_ball_and_raises_the_loss(digits_model, digits, one_thread):
    _, test = digits
    x, y = test.x[:100], test.y[:100]
    loss = torch.nn.functional.cross_entropy
    x_adv = train_pgd(digits_model, x, ce_objective(y), eps=1.0, step=0.25, steps=10, norm="L2")
    size = (x_adv - x).flatten(1).norm(dim=1)
    assert size.max() <= 1.0 + 1e-5 and size.mean() > 0.5  # in the L2 ball, and using it
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert loss(digits_model(x_adv), y) > loss(digits_model(x), y) + 0.5
    linf = train_pgd(digits_model, x, ce_objective(y), eps=0.1, step=0.025, steps=10, norm="Linf")
    assert (linf - x).abs().max() <= 0.1 + 1e-6 and (linf - x).flatten(1).norm(dim=1).max() > 0.3  # L-inf, not L2


@pytest.mark.parametrize("overrides, message", [
    (["train.norm=L3"], r"train.norm='L3' is unknown; use 'Linf' or 'L2'"),
    (["eval.norm=l2"], r"eval.norm='l2' is unknown; use 'Linf' or 'L2'"),
    (["train.eps=2"], r"train.eps=2.0 is outside \(0, 1\]"),
    (["train.norm=L2", "train.eps=0"], r"train.eps=0.0 must be > 0: an L2 budget"),
    (["train.norm=L2", "train.eps=29"], r"train.eps=29.0 is larger than the diameter 28 of the 1x28x28 input space"),
    (["data.name=cifar10", "eval.norm=L2", "eval.eps=60"], r"eval.eps=60.0 is larger than the diameter 55.43"),
    (["eval.autoattack_version=fast"], r"eval.autoattack_version='fast' is unknown; use one of: standard, plus, rand"),
])
def test_bad_norms_budgets_and_versions_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_l2_budgets_above_one_are_allowed():
    cfg = load_config(overrides=["train.norm=L2", "train.eps=3.0", "eval.norm=L2", "eval.eps=3.0"])
    assert cfg.train.eps == 3.0 and cfg.eval.eps == 3.0  # ImageNet's L2 budget, inside Fashion-MNIST's diameter
    assert load_config(overrides=["eval.autoattack_version=rand"]).eval.autoattack_version == "rand"


def test_evaluate_refuses_an_l2_budget_longer_than_the_images(digits_model, digits):
    import rayrobust

    _, test = digits
    with pytest.raises(ConfigError, match=r"eps=9.0 is larger than the diameter 8 of the 1x8x8 input space"):
        rayrobust.evaluate(digits_model, (test.x[:10], test.y[:10]), eps=9.0, norm="L2", n=10, n_autoattack=0,
                           backend="local", verbose=False)
    with pytest.raises(ConfigError, match=r"version='fast' is unknown"):
        rayrobust.evaluate(digits_model, (test.x[:10], test.y[:10]), eps=0.1, n=10, version="fast", backend="local")


def test_autoattack_version_is_recorded(digits_model, digits, one_thread):
    import rayrobust

    _, test = digits
    res = rayrobust.evaluate(digits_model, (test.x[:8], test.y[:8]), eps=2.0, norm="L2", n=8, n_autoattack=8,
                             version="plus", checks=False, backend="local", verbose=False)
    assert res["autoattack_version"] == "plus" and res["autoattack"]["attack"] == "AutoAttack (plus)"
    assert res["norm"] == "L2" and res["eps"] == 2.0
    assert list(res["autoattack"]["per_attack"])[2:8] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]


# --- rayrobust.benchmark ------------------------------------------------------------------------------------
def test_benchmark_defaults_and_errors(monkeypatch, digits_model, digits):
    import rayrobust
    from rayrobust.evaluation import core

    calls = []

    def fake_evaluate(model, dataset, **kw):
        calls.append((dataset, kw))
        return {"clean_acc": 0.9, "autoattack_acc": 0.5, "dataset": "tensors", "n_eval": kw["n"]}

    monkeypatch.setattr(core, "evaluate", fake_evaluate)
    _, test = digits
    pair = (test.x[:20], test.y[:20])
    # RobustBench's positional order: model, n_examples, dataset, threat_model
    assert rayrobust.benchmark(digits_model, 20, pair, "L2", eps=0.5) == (0.9, 0.5)
    kw = calls[-1][1]
    assert (kw["n"], kw["n_autoattack"], kw["norm"], kw["eps"], kw["version"]) == (20, 20, "L2", 0.5, "standard")
    assert kw["batch_size"] == kw["chunk_size"] == 32 and kw["backend"] == "local"  # RobustBench's bs=32, in process
    full = rayrobust.benchmark(digits_model, n_examples=20, dataset=pair, eps=0.1, return_result=True)
    assert full["benchmark"] == {"dataset": "tensors", "threat_model": "Linf", "eps": 0.1, "n_examples": 20,
                                 "model_name": None, "version": "standard"}
    with pytest.raises(ConfigError, match=r"threat_model='corruptions' is not offered; use 'Linf' or 'L2'"):
        rayrobust.benchmark(digits_model, 20, pair, "corruptions", eps=0.1)
    with pytest.raises(ConfigError, match=r"preprocessing must be None"):
        rayrobust.benchmark(digits_model, 20, pair, eps=0.1, preprocessing="Res256Crop224")
    with pytest.raises(ConfigError, match=r"eps is needed for dataset='tensors'"):
        rayrobust.benchmark(digits_model, 20, pair)
    with pytest.raises(ConfigError, match=r"n_examples=50 but the test set has 20 images"):
        rayrobust.benchmark(digits_model, 50, pair, eps=0.1)
    from rayrobust.evaluation.benchmark import LEADERBOARD_EPS

    assert LEADERBOARD_EPS[("cifar10", "Linf")] == 8 / 255 and LEADERBOARD_EPS[("cifar10", "L2")] == 0.5
    assert LEADERBOARD_EPS[("imagenet", "L2")] == 3.0


@pytest.mark.extended
def test_benchmark_called_as_robustbench_readme_matches_evaluate(digits_model, tmp_path, monkeypatch, one_thread):
    """RobustBench's README: clean_acc, robust_acc = benchmark(model, model_name=..., n_examples=..., dataset=...,
    threat_model=..., eps=..., device=..., to_disk=True); the same numbers as evaluate on the same images."""
    import rayrobust
    from rayrobust import benchmark

    monkeypatch.chdir(tmp_path)
    threat_model, dataset = "Linf", "digits"
    device = torch.device("cpu")
    clean_acc, robust_acc = benchmark(digits_model, model_name="Digits2026SmallCNN", n_examples=30, dataset=dataset,
                                      threat_model=threat_model, eps=0.1, device=device, to_disk=True)
    ref = rayrobust.evaluate(digits_model, "digits", eps=0.1, norm="Linf", n=30, n_autoattack=30, batch_size=32,
                             chunk_size=32, backend="local", verbose=False)
    assert (clean_acc, robust_acc) == (ref["clean_acc"], ref["autoattack_acc"])
    assert 0 < robust_acc < clean_acc  # a number that could differ, not 0 = 0
    saved = json.loads((tmp_path / "model_info" / "digits" / "Linf" / "Digits2026SmallCNN.json").read_text())
    assert saved["autoattack_acc"] == robust_acc and saved["benchmark"]["eps"] == 0.1
    # L2, and the full result on request
    res = benchmark(digits_model, n_examples=30, dataset=dataset, threat_model="L2", eps=1.0, device=device,
                    return_result=True, checks=False)
    ref2 = rayrobust.evaluate(digits_model, "digits", eps=1.0, norm="L2", n=30, n_autoattack=30, batch_size=32,
                              chunk_size=32, backend="local", verbose=False, checks=False)
    assert (res["clean_acc"], res["autoattack_acc"]) == (ref2["clean_acc"], ref2["autoattack_acc"])
    assert res["norm"] == "L2" and res["autoattack"]["per_attack"] == ref2["autoattack"]["per_attack"]


# --- Ray Train runs -------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.extended
def test_l2_pgd_at_on_digits_beats_standard_under_l2_autoattack(ray_cluster, tmp_path):
    from rayrobust.evaluation import evaluate_checkpoint
    from rayrobust.train.ray_train import fit

    eps = 0.75  # L2, [0,1] pixel units; the 8x8 digits' diameter is 8
    results = {}
    for method in ("standard", "pgd_at"):
        cfg = tiny_config(tmp_path, train={"method": method, "epochs": 8, "norm": "L2", "eps": eps, "attack_steps": 5,
                                           "val_pgd_steps": 5},
                          eval={"norm": "L2", "eps": eps, "n_eval": 100, "n_autoattack": 50, "pgd_steps": 10,
                                "num_shards": 2, "chunk_size": 25, "checks": False})
        result = fit(cfg, tmp_path / method)
        assert all("val_pgd5_acc" in m for m in result.metrics)
        res = evaluate_checkpoint(cfg, result.checkpoint, tmp_path / method / "eval.json", label=method)
        assert res["norm"] == "L2" and res["eps"] == eps and res["autoattack_version"] == "standard"
        assert res["autoattack"]["attack"] == "AutoAttack (standard)" and not res["flags"]
        results[method] = res
    print({m: (r["clean_acc"], r["pgd_acc"], r["autoattack_acc"]) for m, r in results.items()})
    assert results["pgd_at"]["autoattack_acc"] >= results["standard"]["autoattack_acc"] + 0.2
    assert results["pgd_at"]["clean_acc"] > 0.8


def _write_tiny_cifar10(root: Path, n_train: int = 200, n_test: int = 20) -> None:
    """CIFAR-10 in the format torchvision downloads (python pickles of uint8 rows), random images."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = n_train // 5
    for b in range(5):
        with open(d / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, per).tolist()}, f, protocol=2)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, 10, n_test).tolist()}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f, protocol=2)


@pytest.mark.ray
@pytest.mark.extended
def test_cifar10_recipe_on_tiny_files_trains_augmented_and_resumes_exactly(ray_cluster, tmp_path):
    """configs/cifar10.yaml on tiny CIFAR-format files (CIFAR-10 cannot be downloaded here): augmentation on,
    the piecewise schedule, early stopping; a run resumed after a lost epoch replays the uninterrupted one."""
    from rayrobust.checkpoint import load_checkpoint
    from rayrobust.train.ray_train import fit

    _write_tiny_cifar10(tmp_path / "data")
    cfg = load_config(REPO / "configs" / "cifar10.yaml", overrides=[
        f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "data.download=false", "data.val_size=40",
        "model.name=tiny_cnn", "train.epochs=3", "train.lr_milestones=[2]", "train.batch_size=32",
        "train.attack_steps=2", "train.val_pgd_steps=2", "train.use_gpu=false", "train.cpus_per_worker=1"])
    assert cfg.data.augment and cfg.train.lr_schedule == "piecewise" and cfg.train.early_stopping
    full = fit(cfg, tmp_path / "a")
    final = load_checkpoint(tmp_path / "a" / "checkpoints" / "epoch_003")
    assert final["provenance"]["augment"] == "random crop (pad 4, zeros) + horizontal flip"
    assert [m["lr"] for m in final["history"]] == pytest.approx([0.1, 0.1, 0.01])  # lr/10 from epoch 3
    record = json.loads((tmp_path / "a" / "train.json").read_text())
    best = max(final["history"], key=lambda m: m["val_pgd2_acc"])["epoch"]
    assert record["selection"]["epoch"] == best and full.checkpoint.name == f"epoch_{best:03d}"
    # lost after epoch 2: the resumed run replays epoch 3 with the same crops, flips and attack starts
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "epoch_003")
    resumed = fit(cfg, tmp_path / "a")
    assert resumed.resumed_from == 2
    again = load_checkpoint(tmp_path / "a" / "checkpoints" / "epoch_003")
    for k, v in final["model"].items():
        assert torch.equal(v, again["model"][k]), k
    # without augmentation the same run ends elsewhere: the augmentation was in the training
    plain = fit(load_config(REPO / "configs" / "cifar10.yaml", overrides=[
        f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "data.download=false", "data.val_size=40",
        "model.name=tiny_cnn", "train.epochs=1", "train.lr_milestones=[2]", "train.batch_size=32",
        "train.attack_steps=2", "train.val_pgd_steps=2", "train.use_gpu=false", "train.cpus_per_worker=1",
        "data.augment=false"]), tmp_path / "plain")
    first = load_checkpoint(tmp_path / "a" / "checkpoints" / "epoch_001")["model"]
    assert any(not torch.equal(v, load_checkpoint(plain.checkpoint)["model"][k]) for k, v in first.items())
