"""Randomized and probability outputs: `evaluate` never crashes on them and reports an attack that works.

A model with Gaussian input noise at inference is detected before AutoAttack (two forward passes), flagged
`nondeterministic` and attacked with AutoAttack's "rand" version (EOT); its number must not exceed an EOT PGD
attack's. A model returning saturated probabilities is flagged `softmax_output`, attacked on its outputs and on
their log, and the lower number must not exceed PGD through its logits.
"""
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rayrobust
from rayrobust.attacks import PGD
from rayrobust.attacks.autoattack import (RAND_EOT, RAND_VOTES, LogOutputs, verify_examples, attack_label,
                                          autoattack_chunk, misclassified, summarize_autoattack)
from rayrobust.attacks.checks import check_before_autoattack
from rayrobust.tables import summary_row

from conftest import digits_arrays, train_mlp  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::Warning"),  # pyautoattack's own warnings
              pytest.mark.usefixtures("one_thread")]

EPS = 0.1
N = 40
EVAL = dict(eps=EPS, n=N, n_autoattack=N, pgd_steps=10, seed=0, chunk_size=N, verbose=False, backend="local")


@pytest.fixture(scope="module")
def digits():
    x, y = digits_arrays()
    return train_mlp(x[:1400], y[:1400]), x[1400:1400 + N], y[1400:1400 + N]


class GaussianInput(nn.Module):
    """Gaussian noise added to the input at every forward pass, eval mode included (a randomized defense)."""

    def __init__(self, net: nn.Module, sigma: float = 0.2):
        super().__init__()
        self.net, self.sigma = net, sigma

    def forward(self, x):
        return self.net(x + self.sigma * torch.randn_like(x))


class Probabilities(nn.Module):
    """softmax(scale * logits): saturated probabilities (most are exactly 0 or 1 in float32)."""

    def __init__(self, net: nn.Module, scale: float = 100.0):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return F.softmax(self.scale * self.net(x), dim=1)


def majority_accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 1.0 - misclassified(model, x, y, RAND_VOTES).float().mean().item()


def test_random_model_is_attacked_with_eot_and_never_crashes(digits):
    net, x, y = digits
    noisy = GaussianInput(net)
    res = rayrobust.evaluate(noisy, (x, y), **EVAL)
    aa = res["autoattack"]
    assert "nondeterministic" in res["flags"] and res["flags"].count("nondeterministic") == 1
    assert aa["attack"] == f"AutoAttack (rand, EOT={RAND_EOT})" == attack_label("rand")
    assert aa["version"] == "rand" and aa["version_requested"] == "standard"
    assert set(aa["per_attack"]) == {"n", "clean", "apgd-ce", "apgd-dlr", "robust"}
    before = next(c for c in res["checks"] if c["name"] == "nondeterministic")
    assert not before["passed"] and before["detail"].startswith("before AutoAttack") and "2 passes" in before["detail"]
    # EOT PGD (50 steps, 20 gradient samples per step), judged by the same majority vote
    adv = PGD(noisy, eps=EPS, steps=50, eot=RAND_EOT, seed=0).perturb(x, y)
    pgd_eot = majority_accuracy(noisy, adv, y)
    print(f"\nGaussian-input model: clean {aa['per_attack']['clean']:.3f}, {aa['attack']} "
          f"{res['autoattack_acc']:.3f}, EOT PGD-50 {pgd_eot:.3f}")
    assert res["autoattack_acc"] <= pgd_eot + 0.05
    assert res["autoattack_acc"] < aa["per_attack"]["clean"] - 0.2  # the attack does break the model
    # the same seed gives the same result: the model's randomness is seeded per chunk
    again = rayrobust.evaluate(noisy, (x, y), **{**EVAL, "checks": False})
    assert again["autoattack"]["per_attack"] == aa["per_attack"]


def test_probability_outputs_are_also_attacked_on_their_log(digits):
    net, x, y = digits
    probs = Probabilities(net)
    res = rayrobust.evaluate(probs, (x, y), **EVAL)
    aa = res["autoattack"]
    assert "softmax_output" in res["flags"] and res["flags"].count("softmax_output") == 1
    on = aa["by_target"]
    assert set(on) == {"outputs", "log(outputs)"}
    assert res["autoattack_acc"] == min(on["outputs"]["robust"], on["log(outputs)"]["robust"])
    assert aa["attack"] == ("AutoAttack (standard)" if aa["target"] == "outputs"
                            else "AutoAttack (standard) on log(outputs)")
    logits_pgd = rayrobust.attacks.robust_accuracy(net, PGD(net, eps=EPS, steps=50, seed=0), x, y)
    print(f"\nprobability model: AutoAttack on the outputs {on['outputs']['robust']:.3f}, on their log "
          f"{on['log(outputs)']['robust']:.3f}, reported {res['autoattack_acc']:.3f} ({aa['attack']}); "
          f"PGD-50 through the logits {logits_pgd:.3f}")
    assert res["autoattack_acc"] <= logits_pgd + 0.05
    assert on["outputs"]["robust"] > res["autoattack_acc"]  # the outputs alone overstate robustness
    assert summary_row({**res, "method": "probs"})["autoattack_attack"] == aa["attack"]  # named in the table too


def test_deterministic_logit_model_runs_as_before(digits):
    net, x, y = digits
    noisy = GaussianInput(net)
    state = torch.random.get_rng_state()
    assert [f.passed for f in check_before_autoattack(net, x)] == [True, True]
    assert [f.passed for f in check_before_autoattack(noisy, x)] == [False, True]
    assert torch.equal(torch.random.get_rng_state(), state)  # forked: the evaluation's random numbers are unchanged
    kwargs = {**EVAL, "eps": 0.3, "n": 10, "n_autoattack": 10, "chunk_size": 10, "checks": False}
    res = rayrobust.evaluate(net, (x[:10], y[:10]), **kwargs)
    aa = res["autoattack"]
    assert aa["attack"] == "AutoAttack (standard)" and aa["version"] == "standard" and aa["target"] == "outputs"
    assert "version_requested" not in aa and "by_target" not in aa and res["flags"] == []
    direct = autoattack_chunk(net, x[:10], y[:10], eps=0.3, seed=0)
    assert aa["per_attack"] == summarize_autoattack(direct)


def test_log_outputs_is_exact_for_a_softmax_and_safe_otherwise(digits):
    net, x, _ = digits
    with torch.no_grad():
        exact = LogOutputs(Probabilities(net, scale=1000.0))(x)
        assert torch.isfinite(exact).all()
        assert torch.allclose(exact, F.log_softmax(1000.0 * net(x), 1))
        # a probability computed some other way: log of the clamped output, finite everywhere
        clamped = LogOutputs(nn.Sequential(Probabilities(net, scale=1000.0), nn.Identity(), nn.Flatten()))(x)
        assert torch.isfinite(clamped).all() and (clamped.argmax(1) == exact.argmax(1)).all()


def test_random_verification_takes_a_majority_and_does_not_raise(digits):
    net, x, y = digits
    noisy = GaussianInput(net, sigma=0.5)  # noisy enough that single passes disagree
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="correctly classified"):
            verify_examples(net, x, x.clone(), y, ["apgd-ce"] * len(x), 0.1, "Linf")
        # a randomized model: the labels were decided by the majority vote the attack's examples got
        verify_examples(noisy, x, x.clone(), y, ["apgd-ce"] * len(x), 0.1, "Linf", votes=RAND_VOTES)
        with pytest.raises(RuntimeError, match="eps ball"):
            verify_examples(noisy, x, x + 0.2, y, [None] * len(x), 0.1, "Linf", votes=RAND_VOTES)
        # on a deterministic model the majority is the single pass
        assert torch.equal(misclassified(net, x, y, RAND_VOTES), misclassified(net, x, y))


@pytest.mark.ray
def test_ray_backend_equals_local_on_a_random_model(ray_cluster, digits):
    from ray import cloudpickle

    net, x, y = digits
    model = GaussianInput(net)
    kwargs = {**EVAL, "eps": 0.2, "n": 20, "n_autoattack": 20, "chunk_size": 10, "checks": False}
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    try:
        local = rayrobust.evaluate(model, (x[:20], y[:20]), **kwargs)
        sharded = rayrobust.evaluate(model, (x[:20], y[:20]), **{**kwargs, "backend": "ray", "num_shards": 2})
        # what the actors get for a probability model: its log, which they rebuild exactly
        logs = cloudpickle.loads(cloudpickle.dumps(LogOutputs(Probabilities(net))))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert sharded["autoattack"]["backend"] == "ray" and sharded["autoattack"]["num_shards"] == 2
    assert local["flags"] == sharded["flags"] == ["nondeterministic"]
    for key in ("attack", "version", "target", "per_attack"):
        assert sharded["autoattack"][key] == local["autoattack"][key], key
    assert sharded["autoattack_acc"] == local["autoattack_acc"]
    with torch.no_grad():
        assert torch.equal(logs(x), LogOutputs(Probabilities(net))(x))
