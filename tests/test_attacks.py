"""FGSM/PGD and sharded AutoAttack on a tiny digits MLP (no Ray)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rayrobust.attacks import (AA_STANDARD, ATTACKS, FGSM, PGD, accuracy, autoattack_chunk,
                               chunk_plan, chunk_seed, perturbation_norm, robust_accuracy,
                               run_autoattack, summarize_autoattack)
from rayrobust.attacks.autoattack import verify_examples
from rayrobust.errors import ConfigError, DataError


from conftest import digits_arrays, train_mlp  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::Warning"),  # pyautoattack's own warnings
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def digits():
    x, y = digits_arrays()
    model = train_mlp(x[:1400], y[:1400])
    return model, x[1400:], y[1400:]  # held-out 397 examples


@pytest.fixture(scope="module")
def aa_full(digits):
    model, x, y = digits
    return run_autoattack(model, x[:60], y[:60], eps=0.1, seed=7, chunk_size=20)


# ----------------------------------------------------------------------------------------- PGD


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_pgd_stays_in_ball_and_box(digits, norm, eps):
    model, x, y = digits
    x_adv = PGD(model, eps=eps, norm=norm, steps=10, seed=0).perturb(x, y)
    assert x_adv.shape == x.shape and x_adv.device == x.device
    assert perturbation_norm(x_adv - x, norm).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    moved = perturbation_norm(x_adv - x, norm)
    assert (moved > 0.5 * eps).float().mean() > 0.5  # it actually uses the budget


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 1.0)])
def test_pgd_lowers_accuracy(digits, norm, eps):
    model, x, y = digits
    clean = accuracy(model, x, y)
    robust = robust_accuracy(model, PGD(model, eps=eps, norm=norm, steps=10), x, y, batch_size=128)
    assert clean > 0.9
    assert robust < clean - 0.2  # a standard model is far from robust at these budgets


def test_more_steps_do_not_raise_accuracy(digits):
    model, x, y = digits
    x, y = x[:200], y[:200]
    few = robust_accuracy(model, PGD(model, eps=0.1, steps=10, seed=0), x, y)
    many = robust_accuracy(model, PGD(model, eps=0.1, steps=50, restarts=3, seed=0), x, y)
    assert many <= few + 0.01


def test_restarts_keep_first_adversarial(digits):
    model, x, y = digits
    one = PGD(model, eps=0.08, steps=5, seed=3).perturb(x, y)
    three = PGD(model, eps=0.08, steps=5, restarts=3, seed=3).perturb(x, y)
    with torch.no_grad():
        fooled_one = model(one).argmax(1) != y
        fooled_three = model(three).argmax(1) != y
    # restart 1 is the same run (same seed), so every point it fooled stays fooled, unchanged
    assert torch.equal(three[fooled_one], one[fooled_one])
    assert bool((fooled_three | ~fooled_one).all()) and fooled_three.sum() >= fooled_one.sum()


def test_pgd_is_deterministic_given_seed(digits):
    model, x, y = digits
    a = PGD(model, eps=0.1, seed=5).perturb(x, y)
    b = PGD(model, eps=0.1, seed=5).perturb(x, y)
    c = PGD(model, eps=0.1, seed=6).perturb(x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_mode_and_params_untouched(digits):
    model, x, y = digits
    model.train()
    state = torch.get_rng_state()
    PGD(model, eps=0.1, steps=3).perturb(x[:50], y[:50])
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), state)
    model.eval()


def test_fgsm_equals_analytic_sign_step():
    torch.manual_seed(0)
    lin = nn.Linear(64, 10)
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    eps = 0.05
    # d CE / d x = W^T (softmax(Wx + b) - onehot(y))
    with torch.no_grad():
        p = F.softmax(lin(x.flatten(1)), dim=1)
        grad = (p - F.one_hot(y, 10).float()) @ lin.weight  # (16, 64)
    expected = (x + eps * grad.sign().view_as(x)).clamp(0, 1)
    x_adv = FGSM(model, eps=eps).perturb(x, y)
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert FGSM(model, eps=eps).step_size == eps
    assert FGSM(model, eps=eps, random_start=True).step_size == pytest.approx(1.25 * eps)
    assert PGD(model, eps=eps, steps=10).step_size == pytest.approx(2.5 * eps / 10)


def test_l2_step_and_random_start():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.full((8, 1, 8, 8), 0.5)  # centre of the box: clipping never shrinks the step
    y = torch.zeros(8, dtype=torch.long)
    one_step = PGD(model, eps=1.0, norm="L2", steps=1, step_size=0.3, random_start=False)
    moved = perturbation_norm(one_step.perturb(x, y) - x, "L2")
    assert torch.allclose(moved, torch.full((8,), 0.3), atol=1e-5)  # normalised-gradient step
    start = PGD(model, eps=0.4, norm="L2", steps=1, step_size=1e-9, seed=0).perturb(x, y)
    radius = perturbation_norm(start - x, "L2")
    assert (radius <= 0.4 + 1e-5).all() and radius.min() > 0.2  # uniform in a 64-d ball: near 0.4


def test_kl_loss_increases_divergence(digits):
    model, x, y = digits
    x_adv = PGD(model, eps=0.1, steps=10, loss="kl", seed=0).perturb(x, y)
    x_rand = PGD(model, eps=0.1, steps=1, step_size=1e-9, loss="kl", seed=0).perturb(x, y)
    with torch.no_grad():
        logp = F.log_softmax(model(x), 1)

        def kl(z):
            return F.kl_div(F.log_softmax(model(z), 1), logp, log_target=True,
                            reduction="batchmean").item()

        assert kl(x_adv) > 10 * kl(x_rand)


def test_registry_and_validation(digits):
    model = digits[0]
    assert ATTACKS.names() == ["fgsm", "pgd"]
    assert isinstance(ATTACKS.create("pgd", model=model, eps=0.1), PGD)
    with pytest.raises(ConfigError, match="fgsm, pgd"):
        ATTACKS.get("cw")
    bad = [dict(eps=0.0), dict(eps=1.5), dict(eps=-0.1), dict(eps=0.1, steps=0),
           dict(eps=0.1, restarts=0), dict(eps=0.1, norm="L3"), dict(eps=0.1, loss="hinge"),
           dict(eps=0.1, step_size=0.0), dict(eps=0.1, loss="kl", random_start=False)]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            PGD(model, **kwargs)
    with pytest.raises(ConfigError, match="one step"):
        FGSM(model, eps=0.1, steps=10)
    PGD(model, eps=3.0, norm="L2")  # L2 budgets may exceed 1


# ---------------------------------------------------------------------------------- AutoAttack


def test_autoattack_summary_is_consistent(digits, aa_full):
    model, x, y = digits
    s = summarize_autoattack(aa_full, AA_STANDARD)
    assert s["n"] == 60 and list(s)[1:] == ["clean", *AA_STANDARD, "robust"]
    assert s["clean"] == pytest.approx(accuracy(model, x[:60], y[:60]))
    accs = [s["clean"], *(s[a] for a in AA_STANDARD)]
    assert all(b <= a for a, b in zip(accs, accs[1:]))  # each attack only removes points
    assert s["robust"] == s["square"] < s["clean"]
    assert 0 < s["robust"]  # some points survive eps=0.1: the chunks do real work
    # AutoAttack is at least as strong as PGD-10 on the same points
    pgd = robust_accuracy(model, PGD(model, eps=0.1, steps=10), x[:60], y[:60])
    assert s["robust"] <= pgd + 1e-9


@pytest.mark.extended  # the default run compares chunked AutoAttack with pyautoattack's (test_autoattack_reference.py)
def test_autoattack_sharding_is_exact(digits, aa_full):
    model, x, y = digits
    x, y = x[:60], y[:60]
    plan = chunk_plan(60, 20)
    assert plan == [(0, 20), (20, 40), (40, 60)]
    merged = [None] * 60
    for worker_chunks in ([2, 0], [1]):  # two "workers", out of order
        for i in worker_chunks:
            start, stop = plan[i]
            merged[start:stop] = autoattack_chunk(model, x[start:stop], y[start:stop], eps=0.1,
                                                  seed=chunk_seed(7, i))
    assert merged == aa_full


def test_autoattack_chunk_restores_state(digits):
    model, x, y = digits
    model.train()
    rng = torch.get_rng_state()
    out = autoattack_chunk(model, x[:10], y[:10], eps=0.1, version="custom", attacks=["apgd-ce",
                                                                                      "fab-t"])
    assert len(out) == 10 and set(out) <= {None, "clean", "apgd-ce", "fab-t"}
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    model.eval()


def test_run_autoattack_progress_and_custom(digits):
    model, x, y = digits
    calls = []
    out = run_autoattack(model, x[:12], y[:12], eps=0.1, version="custom", attacks=["apgd-ce"],
                         chunk_size=5, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(5, 12), (10, 12), (12, 12)]
    assert set(out) <= {None, "clean", "apgd-ce"} and "apgd-ce" in out


def test_verify_rejects_invalid_adversarials():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.full((2, 1, 2, 2), 0.5)
    y = model(x).argmax(1)
    with torch.no_grad():
        verify_examples(model, x, x.clone(), y, [None, None], 0.1, "Linf")  # nothing claimed: fine
        with pytest.raises(RuntimeError, match="eps ball"):
            verify_examples(model, x, x + 0.2, y, [None, None], 0.1, "Linf")
        with pytest.raises(RuntimeError, match="correctly classified"):
            verify_examples(model, x, x.clone(), y, ["apgd-ce", None], 0.1, "Linf")


def test_summarize_and_plan_numbers():
    s = summarize_autoattack(["clean", "apgd-ce", None, "square", "apgd-ce"], AA_STANDARD)
    assert s == {"n": 5, "clean": 0.8, "apgd-ce": 0.4, "apgd-t": 0.4, "fab-t": 0.4,
                 "square": 0.2, "robust": 0.2}
    with pytest.raises(ValueError):
        summarize_autoattack(["fab"], AA_STANDARD)
    assert chunk_plan(0, 10) == [] and chunk_plan(5, 10) == [(0, 5)]
    assert len({chunk_seed(s, i) for s in range(3) for i in range(100)}) == 300


def test_autoattack_validation(digits):
    model, x, y = digits
    with pytest.raises(ConfigError, match="version"):
        autoattack_chunk(model, x[:4], y[:4], eps=0.1, version="fast")
    with pytest.raises(ConfigError, match="custom"):
        autoattack_chunk(model, x[:4], y[:4], eps=0.1, attacks=["apgd-ce"])
    with pytest.raises(ConfigError, match="unknown"):
        autoattack_chunk(model, x[:4], y[:4], eps=0.1, version="custom", attacks=["cw"])
    with pytest.raises(ConfigError, match="chunk_size"):
        run_autoattack(model, x[:4], y[:4], eps=0.1, chunk_size=0)
    with pytest.raises(DataError, match=r"\[0,1\]"):
        autoattack_chunk(model, x[:4] * 255, y[:4], eps=0.1)
