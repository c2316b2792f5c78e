"""Sharded AutoAttack on Ray actors and the public `rayrobust.evaluate` entry point.

That the sharded run equals the in-process one image by image is tests/test_ray_free.py's
`test_local_backend_equals_sharded_ray_path`; that it agrees with pyautoattack's own
`run_standard_evaluation` is tests/test_autoattack_reference.py."""
import json

import pytest
import torch

import rayrobust
from rayrobust.errors import ConfigError

pytestmark = pytest.mark.ray

EPS = 0.1


@pytest.mark.extended  # the reference-agreement test (default tier) checks the per-attack chain on the sharded path
def test_evaluate_accepts_any_module_and_reports_per_attack(ray_cluster, digits_model, digits):
    _, test = digits

    class Wrapped(torch.nn.Module):  # a user's own model: just logits from [0,1] images
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    res = rayrobust.evaluate(Wrapped(digits_model), (test.x, test.y), eps=EPS, n=120, n_autoattack=40,
                             pgd_steps=10, num_shards=2, chunk_size=20, verbose=False)
    assert res["n_eval"] == 120 and res["n_autoattack"] == 40
    assert res["clean_acc"] > 0.85
    per = res["autoattack"]["per_attack"]
    assert list(per)[:2] == ["n", "clean"] and {"apgd-ce", "apgd-t", "fab-t", "square", "robust"} <= set(per)
    chain = [per[k] for k in ("clean", "apgd-ce", "apgd-t", "fab-t", "square")]
    assert all(a >= b for a, b in zip(chain, chain[1:]))
    assert res["autoattack_acc"] == per["robust"] <= res["autoattack"]["per_attack"]["clean"]
    assert "weaker than AutoAttack" in res["pgd"]["strength"]
    assert res["flags"] == []  # a plainly trained small CNN trips no sanity check
    json.dumps(res)  # the result is JSON-serialisable as written to eval.json


def test_evaluate_flags_a_gradient_masked_model(ray_cluster, digits_model, digits):
    _, test = digits

    class Masked(torch.nn.Module):
        """Quantised input with a straight-through-free round: zero gradients, broken by Square."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(torch.round(x * 4) / 4)

    res = rayrobust.evaluate(Masked(digits_model), (test.x, test.y), eps=EPS, n=100, n_autoattack=20,
                             pgd_steps=5, num_shards=1, chunk_size=20, verbose=False)
    assert "zero_gradients" in res["flags"]


def test_evaluate_rejects_bad_inputs(digits_model, digits):
    _, test = digits
    with pytest.raises(ConfigError, match="outside"):
        rayrobust.evaluate(digits_model, (test.x, test.y), eps=0)
    with pytest.raises(ConfigError, match=r"\[0,1\]"):
        rayrobust.evaluate(digits_model, (test.x * 255, test.y), eps=0.1, n=10, n_autoattack=0)
    with pytest.raises(ConfigError, match="n_autoattack"):
        rayrobust.evaluate(digits_model, (test.x, test.y), eps=0.1, n=10, n_autoattack=20)
