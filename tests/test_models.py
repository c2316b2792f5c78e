"""Contract tests run over every registered model, plus per-model architecture checks. No Ray."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rayrobust.errors import ConfigError
from rayrobust.models import MODELS, RobustModel, create_model, list_models

NUM_CLASSES = 7  # deliberately not 10, so a hard-coded head would show
LATENT = {"tiny_cnn": 16, "small_cnn": 100, "small_cnn_wide": 256, "preact_resnet18": 512, "wrn_34_10": 640}
BATCH = {"wrn_34_10": 2, "preact_resnet18": 2}  # the ResNets are big: keep their CPU passes small
ALL = list_models()

_cache: dict = {}


def get_model(name: str) -> RobustModel:
    """One eval-mode model per name, 3 channels at 32x32 (every model accepts that)."""
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = create_model(name, num_classes=NUM_CLASSES, in_channels=3, input_size=32,
                                    mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)).eval()
    return _cache[name]


def batch_for(name: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH.get(name, 4), 3, 32, 32, generator=g)  # (N, 3, 32, 32) in [0,1]


def test_every_model_is_registered_on_import():
    assert ALL == sorted(LATENT)
    assert all(name in MODELS for name in LATENT)


# ---------------------------------------------------------------------------------------------
# Contract, over every registered model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_shapes_and_attributes(name):
    model, x = get_model(name), batch_for(name)
    with torch.no_grad():
        latent = model.forward_features(x)
        logits = model(x)
    assert isinstance(model, RobustModel)
    assert (model.num_classes, model.in_channels, model.input_size) == (NUM_CLASSES, 3, 32)
    assert model.num_features == LATENT[name]
    assert latent.shape == (len(x), LATENT[name])
    assert logits.shape == (len(x), NUM_CLASSES)
    assert torch.isfinite(logits).all()
    assert logits.std(dim=0).max() > 0  # different images give different logits


@pytest.mark.parametrize("name", ALL)
def test_forward_is_head_of_features(name):
    model, x = get_model(name), batch_for(name)
    with torch.no_grad():
        split = model.forward_head(model.forward_features(x))
        whole = model(x)
    torch.testing.assert_close(whole, split, atol=0, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_normalisation_happens_inside(name):
    model, x = get_model(name), batch_for(name)
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    assert {"mean", "std"} <= set(model.state_dict())  # checkpoints carry the normalisation
    with torch.no_grad():
        before = model(x)
        # features() sees (x - mean) / std: feeding it the normalised input reproduces the latent
        manual = model.features((x - model.mean) / model.std)
        torch.testing.assert_close(model.forward_features(x), manual, atol=0, rtol=0)
        saved = model.mean.clone()
        try:
            model.mean.add_(0.3)
            after = model(x)
        finally:
            model.mean.copy_(saved)
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("name", ALL)
def test_input_gradient_is_nonzero(name):
    model = get_model(name)
    x = batch_for(name).requires_grad_(True)
    y = torch.arange(len(x)) % NUM_CLASSES
    F.cross_entropy(model(x), y).backward()
    grad = x.grad  # (N, 3, 32, 32)
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(dim=1) > 0).all()  # every example gets a gradient
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ALL)
def test_channels_last_gives_same_output(name):
    model, x = get_model(name), batch_for(name)
    with torch.no_grad():
        reference = model(x)
        model.to(memory_format=torch.channels_last)
        try:
            out = model(x.contiguous(memory_format=torch.channels_last))
        finally:
            model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)  # WRN logits are ~2


# WRN-34-10's bf16 pass takes ~30 s on a CPU without bf16 units: in the extended tier.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.extended) if n == "wrn_34_10" else n for n in ALL])
def test_bf16_autocast_runs_close(name):
    model, x = get_model(name), batch_for(name)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    scale = max(1.0, reference.abs().max().item())
    assert (out.float() - reference).abs().max() < 0.05 * scale  # bf16 has ~3 significant digits


# ---------------------------------------------------------------------------------------------
# Errors a user can cause
# ---------------------------------------------------------------------------------------------
def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        create_model("resnet9000")
    message = str(err.value)
    assert "resnet9000" in message
    assert all(name in message for name in ALL)


@pytest.mark.parametrize("name", ["preact_resnet18", "wrn_34_10"])
def test_resnets_reject_28x28_with_a_fix(name):
    with pytest.raises(ConfigError) as err:
        create_model(name, in_channels=1, input_size=28)
    message = str(err.value)
    assert name in message and "32x32" in message and "28x28" in message and "cifar10" in message


def test_small_cnn_rejects_tiny_inputs():
    with pytest.raises(ConfigError, match=r"small_cnn.*8x8.*4x4"):
        create_model("small_cnn", input_size=4)


def test_mean_std_length_and_sign_are_checked():
    with pytest.raises(ConfigError, match="3 channels"):
        create_model("small_cnn", in_channels=3, mean=(0.5,))
    with pytest.raises(ConfigError, match="positive"):
        create_model("small_cnn", std=(0.0,))


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------
def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_small_cnn_is_the_specified_demo_model():
    model = create_model("small_cnn")  # Fashion-MNIST defaults: 1 channel, 28x28, 10 classes
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 16, (5, 5), (2, 2)), (16, 32, (5, 5), (2, 2))]
    assert model.fc[0].in_features == 32 * 7 * 7 and model.fc[0].out_features == 100
    assert (model.head.in_features, model.head.out_features) == (100, 10)
    assert count(model) == 171_158
    torch.testing.assert_close(model.mean.flatten(), torch.tensor([0.5]))  # default normalisation
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_small_cnn_runs_channels_last_and_loads_either_layout():
    """small_cnn keeps its convolutions channels_last (speed); the function is the channels-first one."""
    model = create_model("small_cnn").eval()
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last)
               for c in model.modules() if isinstance(c, nn.Conv2d))
    x = torch.rand(5, 1, 28, 28)
    c1, c2, fc, head = model.conv[0], model.conv[3], model.fc[0], model.head
    h = (x - 0.5) / 0.5
    h = F.max_pool2d(F.relu(F.conv2d(h, c1.weight.contiguous(), c1.bias, padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, c2.weight.contiguous(), c2.bias, padding=2)), 2)
    reference = F.linear(F.relu(F.linear(h.flatten(1), fc.weight, fc.bias)), head.weight, head.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    # a state dict saved in the channels-first layout (older checkpoints) loads into the same function
    plain = {k: v.contiguous() for k, v in model.state_dict().items()}
    other = create_model("small_cnn").eval()
    other.load_state_dict(plain)
    assert other.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(other(x), reference, atol=1e-5, rtol=1e-5)


def test_small_cnn_is_deterministic_in_train_mode():
    model = create_model("small_cnn_wide")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        train_out = model.train()(x)
        eval_out = model.eval()(x)
    torch.testing.assert_close(train_out, eval_out, atol=0, rtol=0)


def test_small_cnn_widths_are_constructor_args():
    wide = create_model("small_cnn_wide")
    assert wide.num_features == 256 and count(wide) == 857_738  # 32/64 convs, 256 latent
    custom = create_model("small_cnn", width1=4, width2=8, latent=12)
    assert custom.num_features == 12
    assert custom(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("size", [8, 28, 32])
def test_small_cnn_accepts_any_size_from_8(size):
    model = create_model("small_cnn", input_size=size, num_classes=3)
    assert model.fc[0].in_features == 32 * (size // 4) ** 2
    assert model(torch.rand(2, 1, size, size)).shape == (2, 3)


def test_resnet_sizes_match_the_reference_networks():
    # parameters outside the head, 3 input channels: the published 11.2M / 46.2M networks
    for name, expected in [("preact_resnet18", 11_167_040), ("wrn_34_10", 46_154_064)]:
        model = get_model(name)
        assert count(model) - count(model.head) == expected, name


def test_resnets_accept_any_channel_count():
    model = create_model("preact_resnet18", in_channels=1, input_size=32)
    assert model.conv1.in_channels == 1
    assert model.eval()(torch.rand(2, 1, 32, 32)).shape == (2, 10)
