"""Training augmentation (random crop + flip), the piecewise schedule and early stopping: unit tests, no Ray."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rayrobust.config import load_config, resolve_augment
from rayrobust.errors import ConfigError
from rayrobust.methods import create_method
from rayrobust.models import create_model
from rayrobust.train.augment import Augment
from rayrobust.train.loop import Schedule, Split, make_optimizer, piecewise_lr, train_epoch


def reference_crop_flip(x, rows, cols, flips, pad, mode):
    """torchvision's RandomCrop(padding=pad) + RandomHorizontalFlip, one image at a time, with given draws."""
    padded = F.pad(x, (pad,) * 4, mode="constant" if mode == "zeros" else "reflect")
    out = []
    for i in range(len(x)):
        img = padded[i, :, rows[i]:rows[i] + x.shape[2], cols[i]:cols[i] + x.shape[3]]
        out.append(img.flip(-1) if flips[i] else img)
    return torch.stack(out)


@pytest.mark.parametrize("name, on", [("cifar10", True), ("cifar100", True), ("fashion_mnist", False),
                                      ("digits", False)])
def test_augmentation_is_on_for_32x32_and_off_for_28x28(name, on):
    cfg = load_config(overrides=[f"data.name={name}"])
    assert cfg.data.augment is on  # resolved when the config is read, so `rayrobust config` shows it
    assert cfg.data.augment_pad == 4 and cfg.data.augment_padding == "zeros"
    # a config may ask for it on 28x28 (or turn it off on 32x32)
    assert load_config(overrides=[f"data.name={name}", f"data.augment={not on}"]).data.augment is (not on)
    # datasets of unknown shape resolve when their images load
    assert resolve_augment(None, (3, 32, 32)) is True and resolve_augment(None, (1, 28, 28)) is False
    assert resolve_augment(True, (1, 28, 28)) is True


def test_bad_augment_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"data.augment_padding='mirror' is unknown; use 'zeros' or 'reflect'"):
        load_config(overrides=["data.augment_padding=mirror"])
    with pytest.raises(ConfigError, match=r"data.augment_pad=-1 must be >= 0"):
        load_config(overrides=["data.augment_pad=-1"])


@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_augment_is_random_crop_plus_flip_and_seeded(padding):
    x = torch.rand(64, 3, 32, 32)
    aug = Augment(pad=4, padding=padding)
    out = aug(x, seed=3, epoch=2, step=5)
    assert out.shape == x.shape and out.device == x.device and out.dtype == x.dtype
    rows, cols, flips = aug.draws(64, seed=3, epoch=2, step=5)
    assert torch.equal(out, reference_crop_flip(x, rows, cols, flips, 4, padding))
    # every offset in [0, 8] and both flip outcomes occur over the batch: it is random, not a fixed shift
    assert rows.min() >= 0 and rows.max() <= 8 and cols.min() >= 0 and cols.max() <= 8
    assert 0 < int(flips.sum()) < 64 and len(set(rows.tolist())) > 3
    # the same (seed, epoch, step) gives the same batch; another step, epoch, seed or rank another one
    assert torch.equal(out, aug(x, seed=3, epoch=2, step=5))
    for other in ({"step": 6}, {"epoch": 3}, {"seed": 4}, {"rank": 1}):
        kw = {"seed": 3, "epoch": 2, "step": 5, **other}
        assert not torch.equal(out, aug(x, **kw)), other
    assert not torch.equal(out, x)


def test_zero_and_reflect_padding_differ_at_the_border():
    x = torch.rand(32, 3, 32, 32) * 0.5 + 0.5  # no pixel is 0: zero padding shows as zeros
    zeros = Augment(padding="zeros")(x, seed=0, epoch=0, step=0)
    reflect = Augment(padding="reflect")(x, seed=0, epoch=0, step=0)
    assert (zeros == 0).any() and not (reflect == 0).any()


def _tiny_cifar(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(epochs, *, augment, start=None, seed=0):
    """tiny_cnn trained with fgsm_rs on 32x32 images; epochs [start_epoch, epochs) from `start` = (model, opt)."""
    x, y = _tiny_cifar()
    data = Split(x, y, x[:0], y[:0])
    method = create_method("fgsm_rs", eps=8 / 255)
    if start is None:
        torch.manual_seed(seed)
        model = create_model("tiny_cnn", num_classes=10, in_channels=3, input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
        opt = make_optimizer(model, 0.05, 0.9, 5e-4, nesterov=False)
        first = 0
    else:
        model, opt, first = start
    for epoch in range(first, epochs):
        torch.manual_seed(seed * 1_000 + epoch * 10)  # as the Ray Train worker does: attack starts replay on resume
        train_epoch(model, method, opt, data, epoch=epoch, epochs=epochs, batch_size=32, lr=0.05, seed=seed,
                    augment=augment, schedule=Schedule("piecewise", (1,), 0.1), progress=False)
    return model, opt


def test_resumed_run_with_augmentation_replays_the_uninterrupted_one(one_thread):
    aug = Augment(pad=4, padding="zeros")
    full, _ = _train(3, augment=aug)
    # interrupted after epoch 1: what an epoch checkpoint holds, restored into a new model and optimizer
    part, opt = _train(1, augment=aug)
    state, opt_state = copy.deepcopy(part.state_dict()), copy.deepcopy(opt.state_dict())
    torch.manual_seed(123)  # the restarted process's RNG is elsewhere
    fresh = create_model("tiny_cnn", num_classes=10, in_channels=3, input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    fresh.load_state_dict(state)
    fresh_opt = make_optimizer(fresh, 0.05, 0.9, 5e-4, nesterov=False)
    fresh_opt.load_state_dict(opt_state)
    resumed, _ = _train(3, augment=aug, start=(fresh, fresh_opt, 1))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # the augmentation is in the training: without it the same run ends elsewhere
    plain, _ = _train(3, augment=None)
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(), plain.state_dict().values()))


def test_piecewise_schedule_decays_at_the_milestones():
    assert [piecewise_lr(e, 0.1, (100, 150)) for e in (0, 99, 100, 149, 150, 199)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    s = Schedule("piecewise", (2,), 0.1)
    assert s.lr(epoch=1, step=9, steps=10, epochs=4, lr=0.2) == pytest.approx(0.2)
    assert s.lr(epoch=2, step=0, steps=10, epochs=4, lr=0.2) == pytest.approx(0.02)
    one = Schedule("one_cycle")
    assert one.lr(epoch=0, step=0, steps=10, epochs=1, lr=0.2) == 0.0  # warm-up from 0
    with pytest.raises(ConfigError, match=r"train.lr_schedule='cosine' is unknown; use 'one_cycle' or 'piecewise'"):
        load_config(overrides=["train.lr_schedule=cosine"])
    with pytest.raises(ConfigError, match=r"train.lr_milestones=\[150, 100\] must be increasing"):
        load_config(overrides=["train.lr_milestones=[150, 100]"])


def test_early_stopping_selects_the_best_validation_pgd_epoch(tmp_path):
    from rayrobust.checkpoint import best_validation_epoch, checkpoint_name, save_checkpoint, selected_checkpoint
    from rayrobust.layout import RunLayout

    history = [{"epoch": 1, "val_pgd10_acc": 0.30}, {"epoch": 2, "val_pgd10_acc": 0.45},
               {"epoch": 3, "val_pgd10_acc": 0.41}]
    assert best_validation_epoch(history) == (2, "val_pgd10_acc", 0.45)
    assert best_validation_epoch([{"epoch": 1, "loss": 1.0}]) is None
    ckpts = tmp_path / "run" / "pgd_at" / "checkpoints"
    for stop in (True, False):
        for epoch in (1, 2, 3):
            cfg = load_config(overrides=[f"train.early_stopping={stop}"]).to_dict()
            save_checkpoint(ckpts / checkpoint_name(epoch), {"epoch": epoch, "history": history[:epoch], "config": cfg})
        chosen, selection = selected_checkpoint(ckpts)
        expected = 2 if stop else 3
        assert chosen.name == checkpoint_name(expected) and selection["epoch"] == expected
        # what `rayrobust evaluate` and the pipeline evaluate when no checkpoint is named
        assert RunLayout(tmp_path / "run").latest_checkpoint("pgd_at").name == checkpoint_name(expected)
