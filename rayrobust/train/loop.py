"""The training loop core: plain PyTorch, no Ray. `rayrobust.train.ray_train` runs it per worker.

Data are whole tensors in memory (Fashion-MNIST/CIFAR scale); each worker takes a disjoint slice
of an epoch permutation seeded by (seed, epoch), so a resumed run replays the same batches.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..methods import Method


@dataclass
class Split:
    x_train: torch.Tensor  # (N,C,H,W) in [0,1]
    y_train: torch.Tensor  # (N,)
    x_val: torch.Tensor
    y_val: torch.Tensor


def train_val_split(x: torch.Tensor, y: torch.Tensor, val_size: int, seed: int) -> Split:
    """Hold out `val_size` training images (a seeded choice) for per-epoch validation."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    val, train = perm[:val_size], perm[val_size:]
    return Split(x[train], y[train], x[val], y[val])


def epoch_batches(n: int, batch_size: int, *, epoch: int, seed: int, rank: int = 0, world: int = 1):
    """Index tensors of this worker's batches for one epoch; every worker gets the same count."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_worker = batch_size // world  # global batch split across workers
    steps = n // batch_size  # drop the last partial global batch
    mine = perm[: steps * batch_size].view(steps, world, per_worker)[:, rank]  # (steps, per_worker)
    return list(mine)


def one_cycle_lr(step: int, total: int, peak: float, warmup: float = 0.3) -> float:
    """Linear warm-up to `peak` over the first `warmup` fraction of steps, then linear decay to 0."""
    t = step / max(1, total)
    return peak * (t / warmup if t < warmup else max(0.0, (1 - t) / (1 - warmup)))


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)


def train_step(model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               *, amp_dtype: Optional[torch.dtype] = None) -> Tuple[float, Dict[str, float]]:
    """One optimisation step of `method` on a batch; returns (loss, method metrics)."""
    model.train()
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss, metrics = method.loss(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), metrics


def train_epoch(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    data: Split,
    *,
    epoch: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    rank: int = 0,
    world: int = 1,
    device: torch.device = torch.device("cpu"),
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, float]:
    """Train one epoch; returns mean loss, mean method metrics, images/s and seconds."""
    batches = epoch_batches(len(data.x_train), batch_size, epoch=epoch, seed=seed, rank=rank, world=world)
    total_steps = epochs * len(batches)
    sums: Dict[str, float] = {}
    start = time.perf_counter()
    report_every = max(1, len(batches) // 4)
    for i, idx in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = one_cycle_lr(epoch * len(batches) + i, total_steps, lr)
        x = data.x_train[idx].to(device, non_blocking=True)
        y = data.y_train[idx].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, metrics = train_step(model, method, optimizer, x, y, amp_dtype=amp_dtype)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at epoch {epoch + 1} step {i}; lower train.lr")
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v
        if log and (i + 1) % report_every == 0 and i + 1 < len(batches):
            log(f"  epoch {epoch + 1}/{epochs}  step {i + 1}/{len(batches)}  loss {sums['loss'] / (i + 1):.4f}")
    seconds = time.perf_counter() - start
    out = {k: v / max(1, len(batches)) for k, v in sums.items()}
    out["images_per_s"] = len(batches) * batch_size / max(seconds, 1e-9)  # global images (all workers)
    out["epoch_seconds"] = seconds
    return out


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, pgd_steps: int, seed: int,
             batch_size: int = 500) -> Dict[str, float]:
    """Clean and PGD accuracy (L-inf, `pgd_steps` steps, labelled weaker than AutoAttack) on the validation set."""
    from ..attacks import ATTACKS, accuracy, robust_accuracy

    was = model.training
    model.eval()
    try:
        attack = ATTACKS.create("pgd", model=model, eps=eps, norm="Linf", steps=pgd_steps, seed=seed)
        return {"val_clean_acc": accuracy(model, x, y, batch_size),
                f"val_pgd{pgd_steps}_acc": robust_accuracy(model, attack, x, y, batch_size)}
    finally:
        model.train(was)
