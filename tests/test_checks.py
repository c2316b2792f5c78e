"""Every sanity check fires on a model built to trip it and stays quiet on a normal model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rayrobust.attacks import autoattack_chunk, summarize_autoattack
from rayrobust.attacks.checks import (Flag, check_deterministic, check_large_eps,
                                      check_monotone_in_eps, check_more_iterations,
                                      check_robust_le_clean, check_softmax_output,
                                      check_square_vs_whitebox, check_zero_gradients, failed,
                                      run_model_checks)


from conftest import digits_arrays, train_mlp  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::Warning"),  # pyautoattack's own warnings
              pytest.mark.usefixtures("one_thread")]

MODEL_FLAGS = {"zero_gradients", "softmax_output", "nondeterministic", "robust_above_clean",
               "not_monotone_in_eps", "robust_at_large_eps", "more_steps_raise_accuracy"}


@pytest.fixture(scope="module")
def digits():
    x, y = digits_arrays()
    model = train_mlp(x[:1400], y[:1400])
    return model, x[1400:1700], y[1400:1700]  # 300 held-out examples


class Softmaxed(nn.Module):
    """Returns probabilities instead of logits."""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return F.softmax(self.net(x), dim=1)


class Noisy(nn.Module):
    """Random logits noise even in eval mode (a randomized defense)."""
    def __init__(self, net, scale=1.0):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        out = self.net(x)
        return out + self.scale * torch.randn_like(out)


class Quantized(nn.Module):
    """Input rounded to `levels` grey levels: piecewise constant, so the input gradient is exactly
    zero (gradient masking) while a black-box search still crosses the steps."""
    def __init__(self, net, levels=2):
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x):
        return self.net(torch.round(x * self.levels) / self.levels)


class Detached(nn.Module):
    """The classic `.detach()` gradient-masking trick: output cut from the input graph."""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.detach())


class Constant(nn.Module):
    """Ignores its input: always predicts `label` (a perfectly 'robust' model on that class)."""
    def __init__(self, label, n_classes=10):
        super().__init__()
        self.bias = nn.Parameter(F.one_hot(torch.tensor(label), n_classes).float() * 5)

    def forward(self, x):
        return self.bias + 0.0 * x.flatten(1).sum(1, keepdim=True)  # (N, n_classes)


# ------------------------------------------------------------------------ quiet on a normal model


def test_all_checks_quiet_on_normal_model(digits):
    model, x, y = digits
    flags, m = run_model_checks(model, x, y, eps=0.1, seed=0)
    assert {f.name for f in flags} == MODEL_FLAGS
    assert failed(flags) == [], [f for f in flags if not f.passed]
    assert m["clean"] > 0.9 and m["n"] == 300
    accs = [m["clean"], *m["pgd_by_eps"].values(), m["pgd_large_eps"]]
    assert accs == sorted(accs, reverse=True)  # non-increasing in eps
    assert m["pgd_large_eps"] <= 0.05 and m["pgd_many"] <= m["pgd_by_eps"][0.1] + 0.01
    assert sorted(m["pgd_by_eps"]) == [0.05, 0.1, 0.2] and m["large_eps"] == 0.5
    assert not model.training


def test_square_quiet_on_normal_model(digits):
    model, x, y = digits
    summary = summarize_autoattack(autoattack_chunk(model, x[:20], y[:20], eps=0.1, seed=1))
    flag = check_square_vs_whitebox(summary)
    assert flag.passed, flag.detail
    assert summary["robust"] < summary["clean"]  # the white-box attacks did break points


# ------------------------------------------------------------------------- each check fires


def test_softmax_output_fires(digits):
    model, x, y = digits
    assert check_softmax_output(model, x).passed
    flag = check_softmax_output(Softmaxed(model), x)
    assert not flag.passed and "probabilities" in flag.detail
    flags, _ = run_model_checks(Softmaxed(model), x[:50], y[:50], eps=0.1, pgd_steps=2)
    assert "softmax_output" in failed(flags)


def test_nondeterministic_fires(digits):
    model, x, y = digits
    assert check_deterministic(model, x).passed
    assert not check_deterministic(Noisy(model), x).passed
    dropout_at_eval = nn.Sequential(model, nn.Dropout(0.5).train())  # eval() would switch it off
    assert not check_deterministic(dropout_at_eval, x).passed
    flags, _ = run_model_checks(Noisy(model), x[:50], y[:50], eps=0.1, pgd_steps=2)
    assert "nondeterministic" in failed(flags)


@pytest.mark.parametrize("wrap", [Quantized, Detached])
def test_zero_gradients_fires(digits, wrap):
    model, x, y = digits
    assert check_zero_gradients(model, x, y).passed
    flag = check_zero_gradients(wrap(model), x, y)
    assert not flag.passed and flag.detail.startswith("1.0000")  # every example: zero gradient
    flags, _ = run_model_checks(wrap(model), x[:50], y[:50], eps=0.1, pgd_steps=2)
    assert "zero_gradients" in failed(flags)


def test_zero_gradients_fraction_threshold(digits):
    model, x, y = digits
    half = torch.cat([x[:10], x[:10]]), torch.cat([y[:10], y[:10]])
    # a model masked only on the second half of a batch: 50% zero-gradient examples
    class HalfMasked(nn.Module):
        def forward(self, z):
            return torch.cat([model(z[:10]), model(z[10:].detach())])
    assert not check_zero_gradients(HalfMasked(), *half, frac=0.4).passed
    assert check_zero_gradients(HalfMasked(), *half, frac=0.5).passed


def test_square_beats_masked_whitebox(digits):
    model, x, y = digits
    masked = Quantized(model, levels=2)
    summary = summarize_autoattack(autoattack_chunk(masked, x[:20], y[:20], eps=0.1, seed=1))
    flag = check_square_vs_whitebox(summary)
    assert not flag.passed, summary
    assert summary["square"] < summary["fab-t"]  # the black-box attack broke what gradients could not


def test_large_eps_fires_on_input_ignoring_model(digits):
    _, x, y = digits
    x3 = x[y == 3]
    flags, m = run_model_checks(Constant(3), x3, torch.full((len(x3),), 3), eps=0.1, pgd_steps=2)
    assert m["pgd_large_eps"] == 1.0
    assert {"robust_at_large_eps", "zero_gradients"} <= set(failed(flags))


# ----------------------------------------------------------------- number-level checks, crafted


def test_robust_le_clean_numbers():
    assert check_robust_le_clean(0.9, {"pgd": 0.5, "apgd-ce": 0.9}).passed
    flag = check_robust_le_clean(0.5, {"pgd": 0.4, "apgd-ce": 0.6})
    assert not flag.passed and "apgd-ce" in flag.detail and "pgd " not in flag.detail


def test_monotone_numbers():
    assert check_monotone_in_eps({0.0: 0.9, 0.05: 0.6, 0.1: 0.605, 0.2: 0.1}).passed  # within tol
    flag = check_monotone_in_eps({0.2: 0.3, 0.0: 0.9, 0.1: 0.2})  # order of keys irrelevant
    assert not flag.passed and flag.name == "not_monotone_in_eps"
    # compared against the lowest accuracy at any smaller eps, not just the neighbour
    assert not check_monotone_in_eps({0.0: 0.9, 0.1: 0.2, 0.2: 0.205, 0.3: 0.25}).passed


def test_large_eps_and_more_iterations_numbers():
    assert check_large_eps(0.0).passed and check_large_eps(0.05).passed
    assert not check_large_eps(0.2).passed
    assert check_more_iterations(0.40, 0.38).passed and check_more_iterations(0.40, 0.409).passed
    flag = check_more_iterations(0.40, 0.45)
    assert not flag.passed and flag.name == "more_steps_raise_accuracy"


def test_square_numbers():
    base = {"n": 100, "clean": 0.9, "apgd-ce": 0.5, "apgd-t": 0.45, "fab-t": 0.45}
    assert check_square_vs_whitebox({**base, "square": 0.45, "robust": 0.45}).passed
    assert not check_square_vs_whitebox({**base, "square": 0.44, "robust": 0.44}).passed
    assert check_square_vs_whitebox({**base, "square": 0.44}, tol=0.02).passed
    assert check_square_vs_whitebox({"n": 5, "clean": 0.9, "square": 0.1}).passed  # nothing before


def test_flag_helpers():
    flags = [Flag("a", True, ""), Flag("b", False, "x"), Flag("c", False, "y")]
    assert failed(flags) == ["b", "c"]
    assert flags[1].to_dict() == {"name": "b", "passed": False, "detail": "x"}
