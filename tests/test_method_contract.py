"""The contract every registered method keeps (rayrobust.methods.base.Method), checked for each one on a
tiny digits batch: a finite loss that training lowers, a decision function with one logit per class, a
method state that survives a save/load round trip, and a begin_epoch that is a function of the weights."""
from __future__ import annotations

import copy

import pytest
import torch

from rayrobust.config import TrainConfig
from rayrobust.methods import METHODS, Method, create_method, method_kwargs
from rayrobust.models import create_model

from conftest import loss_before_after
from test_srd import srd_core  # noqa: F401  (SRD's clusters and dictionaries, built in-process)

NUM_CLASSES = 10


def _make(name: str, train, srd_state):
    tc = TrainConfig(method=name, eps=0.1, attack_steps=2, seed=0)
    method = create_method(name, num_classes=NUM_CLASSES, **method_kwargs(tc))
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=method.output_dim(NUM_CLASSES), in_channels=1, input_size=8,
                         mean=train.mean, std=train.std)
    x, y = train.x[:256], train.y[:256]
    method.fit(x, y)
    method.begin_epoch(model, x, y, 1)
    if method.purifies:  # SRD: the state its pipeline stages would hand it
        method.load_state_dict(srd_state)
    return method, model, x, y


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name, srd_core):  # noqa: F811
    method, model, x, y = _make(name, srd_core["train"], srd_core["state"])
    assert isinstance(method, Method) and method.name == name
    # capabilities are declared on the class, with the base class's defaults elsewhere
    for flag in ("adversarial", "purifies", "certifiable", "needs_semantic"):
        assert isinstance(getattr(type(method), flag), bool), flag
    # a finite loss that a few steps on the batch lower
    before, after = loss_before_after(method, model, x[:128], y[:128], steps=25)
    assert torch.isfinite(torch.tensor([before, after])).all() and after < before, (before, after)
    # the decision function: one logit per class, for any batch size
    decision = method.decision(model).eval()
    with torch.no_grad():
        out = decision(x[:7])
    assert out.shape == (7, NUM_CLASSES) and torch.isfinite(out).all()
    # the method state survives a round trip: a fresh method given it decides identically
    state = method.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = create_method(name, num_classes=NUM_CLASSES, **method_kwargs(TrainConfig(method=name, eps=0.1,
                                                                                      attack_steps=2, seed=0)))
    if state:
        again.load_state_dict(copy.deepcopy(state))
    with torch.no_grad():
        torch.testing.assert_close(again.decision(model).eval()(x[:7]), out)
    # begin_epoch is a function of (weights, epoch, seed): recomputing it on a resumed run gives the same state
    if not method.purifies:
        first = create_method(name, num_classes=NUM_CLASSES, **method_kwargs(TrainConfig(method=name, eps=0.1,
                                                                                          attack_steps=2, seed=0)))
        first.fit(x, y)
        first.begin_epoch(model, x, y, 2)
        second = copy.deepcopy(again)
        second.fit(x, y)
        second.begin_epoch(model, x, y, 2)
        s1, s2 = first.state_dict(), second.state_dict()
        assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def _documented_settings() -> dict:
    """method -> the setting names of its row in docs/methods.md's settings table (§0.1)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    rows = {}
    for m in re.finditer(r"^\| `(\w+)` \| ([^|]*) \| [^|]* \|$", text, re.M):
        rows[m.group(1)] = [] if m.group(2).strip() == "none" else re.findall(r"`(\w+)` =", m.group(2))
    return rows


@pytest.mark.parametrize("name", METHODS.names())
def test_method_settings_contract(name):
    """Its own settings are a validated MethodSettings dataclass, documented; the constructor takes them and
    only common arguments; a mistyped key is an error that names the valid ones."""
    import dataclasses
    import inspect

    from rayrobust.errors import ConfigError
    from rayrobust.methods.base import COMMON_ARGS, MethodSettings

    cls = METHODS.get(name)
    assert dataclasses.is_dataclass(cls.Settings) and issubclass(cls.Settings, MethodSettings)
    names = [f.name for f in dataclasses.fields(cls.Settings)]
    params = inspect.signature(cls.__init__).parameters
    assert list(params)[:2] == ["self", "settings"], list(params)
    others = {p: v for p, v in params.items() if p not in ("self", "settings")}
    assert set(others) <= set(COMMON_ARGS) and all(v.kind is v.KEYWORD_ONLY for v in others.values()), others
    assert not any(v.kind is v.VAR_KEYWORD for v in params.values())  # nothing is swallowed
    method = create_method(name)  # every setting has a default
    assert isinstance(method.settings, cls.Settings)
    with pytest.raises(ConfigError, match=rf"^unknown config key 'train.method_args.{name}.not_a_setting'"):
        create_method(name, not_a_setting=1)
    assert _documented_settings().get(name) == names, f"docs/methods.md §0.1 lists {name}'s settings as {names}"
