"""Baseline methods and the training loop core (no Ray)."""
import pytest
import torch

from rayrobust.errors import ConfigError
from rayrobust.methods import METHODS, create_method
from rayrobust.methods.perturb import ce_objective, linf_pgd
from rayrobust.models import create_model
from rayrobust.train.loop import epoch_batches, one_cycle_lr

from conftest import loss_before_after


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("small_cnn", input_size=8)


def test_registry_lists_baselines_and_rejects_unknown():
    assert {"standard", "pgd_at", "trades", "fgsm_rs"} <= set(METHODS.names())
    with pytest.raises(ConfigError, match="valid methods: .*pgd_at"):
        create_method("pgd-at")


@pytest.mark.parametrize("eps, steps", [(0.0, 7), (1.5, 7), (0.1, 0)])
def test_bad_budget_rejected(eps, steps):
    with pytest.raises(ConfigError):
        create_method("pgd_at", eps=eps, steps=steps)


def test_linf_pgd_stays_in_ball_and_raises_loss(digits):
    train, _ = digits
    model = _model()
    x, y = train.x[:64], train.y[:64]
    x_adv = linf_pgd(model, x, ce_objective(y), eps=0.1, step=0.03, steps=5)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    assert loss(model(x_adv), y) > loss(model(x), y)


@pytest.mark.parametrize("name", ["standard", "pgd_at", "trades", "fgsm_rs"])
def test_each_baseline_lowers_its_loss(name, digits):
    train, _ = digits
    model = _model()
    method = create_method(name, eps=0.1, steps=3)
    first, last = loss_before_after(method, model, train.x[:256], train.y[:256])
    assert last < 0.8 * first
    assert method.decision(model) is model


def test_attack_generation_leaves_train_mode_and_param_grads_alone(digits):
    train, _ = digits
    model = _model().train()
    create_method("pgd_at", eps=0.1, steps=2).loss(model, train.x[:16], train.y[:16])
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_epoch_batches_partition_across_workers():
    one = epoch_batches(100, 20, epoch=3, seed=1)
    two = [epoch_batches(100, 20, epoch=3, seed=1, rank=r, world=2) for r in range(2)]
    assert len(two[0]) == len(two[1]) == len(one) == 5
    for step in range(5):
        merged = torch.cat([two[0][step], two[1][step]])
        assert sorted(merged.tolist()) == sorted(one[step].tolist())
    assert not torch.equal(torch.cat(one), torch.cat(epoch_batches(100, 20, epoch=4, seed=1)))


def test_one_cycle_schedule_shape():
    lrs = [one_cycle_lr(s, 100, 0.1) for s in range(101)]
    assert lrs[0] == 0 and max(lrs) == pytest.approx(0.1) and lrs[-1] == 0
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
