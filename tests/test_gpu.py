"""CUDA against CPU for the Ray-free cores: training numerics, evaluation, purification, the certificate, and
which GPU a training worker binds.

The `gpu` tests skip where torch sees no CUDA device; the device-choice unit test runs everywhere. Only the
Ray-free cores are imported (the same set `tests/test_ray_free.py` checks), and the data are synthetic, so a
GPU machine needs torch, numpy, pyyaml and pyautoattack's Python files, nothing else.

    python -m pytest -m gpu tests/test_gpu.py        # on a GPU machine
"""
from __future__ import annotations

import copy
from typing import Dict, Tuple

import pytest
import torch

import rayrobust
from rayrobust.certify import certify
from rayrobust.methods import create_method
from rayrobust.models import create_model
from rayrobust.semantic.purify import Purifier, purify_batches
from rayrobust.train.devices import bind_device, data_on_device, visible_ids, worker_device
from rayrobust.train.loop import Split, make_optimizer, train_epoch, train_step

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")


def gpu(fn):
    """Mark a test `gpu` and skip it without CUDA."""
    return pytest.mark.gpu(requires_cuda(fn))


# Losses of the bf16-autocast channels_last steps may differ from fp32 by this fraction, step by step.
# bf16 keeps 8 significand bits (relative rounding 2^-9 ~ 0.2% per value); preact_resnet18's 18 layers add
# such errors to logits of order 1, a mean cross-entropy over 64 images averages them down, and the weights
# (lr 0.01, 4 steps) barely move. PGD's sign steps flip only for gradient components near 0, which moves the
# adversarial loss by much less than its spread across the batch. 3% is 20x the largest gap measured with CPU
# bf16 autocast on the same steps (0.14%).
BF16_RTOL = 0.03
EVAL = dict(eps=0.1, n=120, n_autoattack=40, pgd_steps=10, seed=0, chunk_size=20, checks=False, verbose=False,
            backend="local")


def synthetic_images(n: int, *, seed: int, classes: int = 10, side: int = 8, noise: float = 0.08
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A learnable image set without files: x (n, 1, side, side) in [0,1] around one random template per class,
    y (n,). The same seed gives the same templates; `seed + 1` a fresh sample of the same classes."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(classes, 1, side, side, generator=g)  # (classes, 1, side, side), fixed
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (templates[y] + noise * torch.randn(n, 1, side, side, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained() -> Dict[str, object]:
    """small_cnn trained on the CPU with PGD-AT for a few epochs on synthetic 8x8 images, plus test images."""
    x, y = synthetic_images(800, seed=0)
    xt, yt = synthetic_images(200, seed=1)
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=8, mean=[0.5], std=[0.3])
    method = create_method("pgd_at", eps=0.1, steps=3)
    opt = make_optimizer(model, 0.05, 0.9, 5e-4)
    data = Split(x, y, xt[:0], yt[:0])
    for epoch in range(3):
        train_epoch(model, method, opt, data, epoch=epoch, epochs=3, batch_size=64, lr=0.05, seed=0)
    return {"model": model.eval(), "x": x, "y": y, "xt": xt, "yt": yt}


@pytest.fixture
def strict_fp32():
    """No TF32 in CUDA matmuls and convolutions: the fp32 reference is fp32."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def pgd_at_losses(device: torch.device, *, amp_dtype, channels_last: bool, steps: int = 4) -> list:
    """PGD-AT training losses of preact_resnet18 on 64 synthetic 32x32 RGB images, `steps` steps from fixed
    weights; the random starts are seeded per step, so two runs differ only by their arithmetic."""
    torch.manual_seed(0)
    model = create_model("preact_resnet18", num_classes=10, in_channels=3, input_size=32).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (64,), generator=g).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    method = create_method("pgd_at", eps=8 / 255, steps=3)
    opt = make_optimizer(model, 0.01, 0.9, 5e-4)
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)
        losses.append(train_step(model, method, opt, x, y, amp_dtype=amp_dtype)[0])
    return losses


@gpu
def test_bf16_channels_last_pgd_at_tracks_fp32(strict_fp32):
    cuda = torch.device("cuda")
    fp32 = pgd_at_losses(cuda, amp_dtype=None, channels_last=False)
    bf16 = pgd_at_losses(cuda, amp_dtype=torch.bfloat16, channels_last=True)
    assert all(torch.isfinite(torch.tensor(bf16)))
    for a, b in zip(fp32, bf16):
        assert abs(b - a) <= BF16_RTOL * abs(a), (fp32, bf16)


def evaluate_on(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, monkeypatch) -> dict:
    """`rayrobust.evaluate(..., backend="local")` with CUDA hidden (device "cpu") or visible ("cuda")."""
    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        return rayrobust.evaluate(copy.deepcopy(model), (x, y), **EVAL)
    finally:
        monkeypatch.undo()


@gpu
def test_evaluation_on_cuda_equals_cpu(trained, strict_fp32, monkeypatch):
    model, x, y = trained["model"], trained["xt"], trained["yt"]
    on_cpu = evaluate_on(model, x, y, "cpu", monkeypatch)
    on_gpu = evaluate_on(model, x, y, "cuda", monkeypatch)
    n, n_aa = on_cpu["n_eval"], on_cpu["n_autoattack"]
    assert on_cpu["clean_acc"] == on_gpu["clean_acc"]
    assert on_cpu["autoattack"]["per_attack"]["clean"] == on_gpu["autoattack"]["per_attack"]["clean"]
    # PGD's random starts are drawn on the CPU for every device and AutoAttack reseeds per chunk, so the two runs
    # differ by float rounding (and pyautoattack's device RNG): one image may land either side
    assert abs(on_cpu["pgd_acc"] - on_gpu["pgd_acc"]) * n <= 1 + 1e-9, (on_cpu["pgd_acc"], on_gpu["pgd_acc"])
    assert abs(on_cpu["autoattack_acc"] - on_gpu["autoattack_acc"]) * n_aa <= 1 + 1e-9, \
        (on_cpu["autoattack"]["per_attack"], on_gpu["autoattack"]["per_attack"])
    assert on_gpu["autoattack_acc"] < on_gpu["clean_acc"]  # the attack is not vacuous here


def make_purifier(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Purifier:
    """An SRD purifier with one cluster per class (the class means of the latents) and random unit-norm
    dictionaries of 24 atoms over 4x4 patches."""
    with torch.no_grad():
        z = model.forward_features(x)  # (N, d)
    means = torch.stack([z[y == c].mean(0) for c in range(10)])  # (10, d)
    variances = torch.stack([z[y == c].var(0) for c in range(10)]) + 1e-2  # (10, d)
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(10, 24, 16, generator=g)
    atoms = atoms / atoms.norm(dim=2, keepdim=True)  # (10, 24, 1*4*4)
    return Purifier(model, means, variances, atoms, patch_size=4, patch_stride=2, sparsity=0.05, fista_iters=30,
                    blur_sigma=1.0, cluster_class=torch.arange(10)).eval()


def clustr_method(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """A ClusTR method whose clusters (one per class) are the class means of the latents, computed on the CPU."""
    method = create_method("clustr", num_classes=10, k=1)
    with torch.no_grad():
        z = model.forward_features(x)
    centroids = torch.stack([z[y == c].mean(0) for c in range(10)])
    sigma2 = torch.tensor(float((z - centroids[y]).pow(2).mean()), dtype=torch.float64)
    method.load_state_dict({"centroids": centroids, "cluster_class": torch.arange(10), "sigma2": sigma2})
    return method


@gpu
def test_purifier_and_certificate_on_cuda_equal_cpu(trained, strict_fp32):
    model, x, y, xt, yt = (trained[k] for k in ("model", "x", "y", "xt", "yt"))
    purifier = make_purifier(model, x, y)
    images_cpu, k_cpu = purify_batches(purifier, xt, batch_size=64)
    images_gpu, k_gpu = purify_batches(copy.deepcopy(purifier).cuda(), xt.cuda(), batch_size=64)
    assert torch.equal(k_cpu, k_gpu.cpu())
    assert torch.allclose(images_cpu, images_gpu.cpu(), rtol=1e-4, atol=1e-5), \
        (images_cpu - images_gpu.cpu()).abs().max()

    method = clustr_method(model, x, y)
    kw = dict(radii=(0.0, 0.05, 0.1), check_n=40, check_steps=20, check_restarts=1, seed=0)
    on_cpu = certify(model, method, xt, yt, **kw)
    on_gpu = certify(copy.deepcopy(model).cuda(), method, xt, yt, **kw)
    assert on_cpu["clean_acc"] == on_gpu["clean_acc"] and on_cpu["clean_acc"] > 0.5
    assert on_cpu["lipschitz"]["bound"] == pytest.approx(on_gpu["lipschitz"]["bound"], rel=1e-9)
    for key in ("latent_radius", "certified_radius"):
        for stat, v in on_cpu[key].items():
            assert v == pytest.approx(on_gpu[key][stat], rel=1e-4, abs=1e-7), (key, stat)
    assert on_cpu["certified_acc"] == on_gpu["certified_acc"]
    assert on_cpu["flags"] == on_gpu["flags"] == []


@gpu
def test_worker_binds_its_own_gpu():
    count = torch.cuda.device_count()
    last = count - 1  # the highest rank of a node whose workers share CUDA_VISIBLE_DEVICES
    shared = ",".join(str(i) for i in range(count))
    device = bind_device(worker_device([last], shared, device_count=count))
    assert device == torch.device("cuda", last) and torch.cuda.current_device() == last
    assert torch.zeros(1, device="cuda").device == device  # a bare "cuda" tensor lands on the worker's GPU
    # a worker that sees only its own GPU (Ray's per-worker CUDA_VISIBLE_DEVICES) uses cuda:0 whatever its id
    assert bind_device(worker_device(["7"], "7", device_count=1)) == torch.device("cuda", 0)
    assert torch.cuda.current_device() == 0
    with pytest.raises(RuntimeError, match="sees 1 CUDA device"):
        worker_device(["1"], "0,1", device_count=1)


@pytest.mark.parametrize("gpu_ids, visible, count, expected", [
    ([2], "2,3", 2, "cuda:0"),  # ray.train.torch.get_device's documented cases
    ([2], "0,1,2,3", 4, "cuda:2"),
    ([2, 3], "0,1,2,3", 4, "cuda:2"),
    (["1"], "0,1", 2, "cuda:1"),  # rank 1 of a two-GPU node, shared visibility
    (["1"], "1", 1, "cuda:0"),  # rank 1, isolated visibility
    ([3, 1], "3,1", 2, "cuda:0"),  # visible order, not id order
    (["1"], None, 2, "cuda:1"),  # no CUDA_VISIBLE_DEVICES: ids are indices
    (["1"], "NoDevFiles", 2, "cuda:1"),
    ([], "0,1", 2, "cpu"),  # a CPU worker
    ([0], "0", 0, "cpu"),  # torch sees no CUDA device
])
def test_worker_device_follows_ray_placement(gpu_ids, visible, count, expected):
    assert worker_device(gpu_ids, visible, device_count=count) == torch.device(expected)


def test_worker_device_refuses_a_gpu_it_cannot_see():
    with pytest.raises(RuntimeError, match="not in CUDA_VISIBLE_DEVICES"):
        worker_device([2], "0,1", device_count=2)
    with pytest.raises(RuntimeError, match="maps to cuda:3"):
        worker_device([3], None, device_count=2)
    assert visible_ids(" 0, 1 ,") == ["0", "1"] and visible_ids("") is None
    assert bind_device(torch.device("cpu")) == torch.device("cpu")  # no CUDA call for a CPU worker


def _split():
    from rayrobust.train.loop import train_val_split

    return train_val_split(torch.rand(64, 1, 8, 8), torch.arange(64) % 10, 8, seed=0)


def test_in_memory_training_images_stay_put_on_a_cpu_worker():
    split = _split()
    assert data_on_device(split, torch.device("cpu")) is split


@gpu
def test_in_memory_training_images_go_to_the_gpu_once():
    split = _split()
    dev = data_on_device(split, torch.device("cuda", 0))
    assert dev.x_train.is_cuda and dev.y_train.is_cuda and not dev.x_val.is_cuda  # validation stays on the host
    assert torch.equal(dev.x_train.cpu(), split.x_train)
    idx = torch.tensor([3, 1, 2])  # the epoch's CPU index batches gather on the device
    assert torch.equal(dev.x_train[idx].cpu(), split.x_train[idx])
