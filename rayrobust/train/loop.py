"""The training loop core: plain PyTorch, no Ray. `rayrobust.train.ray_train` runs it per worker.

In memory (`train_epoch`): whole tensors (Fashion-MNIST/CIFAR scale); each worker takes a disjoint
slice of an epoch permutation seeded by (seed, epoch), so a resumed run replays the same batches.
Streamed (`train_epoch_stream`): batches of uint8 images from a Ray Data shard
(`stream_batches`), shuffled locally with a seed of (seed, epoch) (docs/data.md says what replays).
Both apply `augment` (random crop + flip, `rayrobust.train.augment`) on the batch's device, seeded by
(seed, epoch, step, rank), and follow the one-cycle or the piecewise learning-rate schedule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from ..methods import Method
from ..progress import Bar
from .augment import Augment


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


def piecewise_lr(epoch: int, lr: float, milestones: Sequence[int] = (100, 150), decay: float = 0.1) -> float:
    """`lr` times `decay` for every milestone the (0-based) epoch has reached: with milestones (100, 150) epochs
    0-99 train at lr, 100-149 at lr/10, 150+ at lr/100 (Rice et al. 2020's piecewise schedule, 200 epochs)."""
    return lr * decay ** sum(epoch >= m for m in milestones)


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule: `one_cycle` (peak `lr`, per step) or `piecewise` (per epoch)."""

    kind: str = "one_cycle"
    milestones: Tuple[int, ...] = (100, 150)
    decay: float = 0.1

    def lr(self, *, epoch: int, step: int, steps: int, epochs: int, lr: float) -> float:
        if self.kind == "piecewise":
            return piecewise_lr(epoch, lr, self.milestones, self.decay)
        return one_cycle_lr(epoch * steps + step, epochs * steps, lr)


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                   nesterov: bool = True) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0)


def _step(model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          amp_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """One optimisation step; returns (detached 0-d loss, method metrics) on the batch's device, no host sync."""
    model.train()
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss, metrics = method.loss(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), metrics


def _as_float(v: Any) -> float:
    return v.item() if isinstance(v, torch.Tensor) else float(v)


def train_step(model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               *, amp_dtype: Optional[torch.dtype] = None) -> Tuple[float, Dict[str, float]]:
    """One optimisation step of `method` on a batch x (B,C,H,W) in [0,1], y (B,); returns (loss, method metrics)
    as Python floats. The epoch loops use the sync-free step and read the device once per log line."""
    loss, metrics = _step(model, method, optimizer, x, y, amp_dtype)
    return loss.item(), {k: _as_float(v) for k, v in metrics.items()}


class _Sums:
    """Running float64 sums of per-step values (0-d tensors on the device, or floats), read on the host only
    when asked: the sums equal Python's float additions of the values' `.item()`s in the same order."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {}
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first step whose loss is not finite

    def add(self, step: int, values: Dict[str, Any]) -> None:
        loss = values["loss"]
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        for k, v in values.items():
            v = v.detach().to(self.device, torch.float64) if isinstance(v, torch.Tensor) else \
                torch.tensor(float(v), dtype=torch.float64, device=self.device)
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def check(self, epoch: int) -> None:
        """Raise FloatingPointError naming the first step whose loss was NaN or infinite (one host sync)."""
        step = int(self.first_bad.item())
        if step >= 0:
            raise FloatingPointError(f"training loss became non-finite at epoch {epoch + 1} step {step}; lower train.lr")

    def means(self, steps: int) -> Dict[str, float]:
        """{name: sum / steps} as floats (one host sync for all values)."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        totals = torch.stack([self.sums[k] for k in keys]).tolist()
        return {k: t / max(1, steps) for k, t in zip(keys, totals)}


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
    progress: Optional[bool] = None,
    augment: Optional[Augment] = None,
    schedule: Schedule = Schedule(),
) -> Dict[str, float]:
    """Train one epoch; returns mean loss, mean method metrics, images/s and seconds.

    `augment` (None: none) transforms every batch on `device`, seeded by (seed, epoch, step, rank).

    `progress` (None: `rayrobust.progress.progress_enabled()`) draws a bar over the epoch's images (rate,
    ETA, running loss) in place of `log`'s step lines; the loss is read at the step lines' cadence."""
    batches = epoch_batches(len(data.x_train), batch_size, epoch=epoch, seed=seed, rank=rank, world=world)
    xy = ((data.x_train[idx], data.y_train[idx]) for idx in batches)
    return _fit_batches(model, method, optimizer, xy, steps=len(batches), epoch=epoch, epochs=epochs,
                        batch_size=batch_size, lr=lr, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
                        log=log, progress=progress, augment=augment, schedule=schedule, seed=seed, rank=rank)


def _fit_batches(model: nn.Module, method: Method, optimizer: torch.optim.Optimizer,
                 xy: Iterable[Tuple[torch.Tensor, torch.Tensor]], *, steps: int, epoch: int, epochs: int,
                 batch_size: int, lr: float, device: torch.device, amp_dtype: Optional[torch.dtype],
                 channels_last: bool, log: Optional[Callable[[str], None]],
                 progress: Optional[bool] = None, augment: Optional[Augment] = None,
                 schedule: Schedule = Schedule(), seed: int = 0, rank: int = 0) -> Dict[str, float]:
    """One epoch's optimisation over (x in [0,1], y) batches: the schedule, the augmentation (on `device`), the
    method's step, mean metrics. Trains exactly `steps` batches; later ones are read and dropped (a stream's
    epoch must end)."""
    sums = _Sums(device)
    start = time.perf_counter()
    report_every = max(1, steps // 4)
    done = 0
    bar = Bar(total=steps * batch_size, desc=f"epoch {epoch + 1}/{epochs}", unit="img", enabled=progress)
    for x, y in xy:
        if done == steps:
            continue  # drain: a streamed shard's epoch ends when its iterator is exhausted
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(epoch=epoch, step=done, steps=steps, epochs=epochs, lr=lr)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if augment is not None:
            x = augment(x, seed=seed, epoch=epoch, step=done, rank=rank)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, metrics = _step(model, method, optimizer, x, y, amp_dtype)
        sums.add(done, {"loss": loss, **metrics})  # on the device: no host sync per step
        done += 1
        bar.update(batch_size)
        if done % report_every == 0 and done < steps and (bar.enabled or log):
            sums.check(epoch)
            running = sums.means(done)["loss"]
            if bar.enabled:
                bar.postfix(f"loss {running:.4f}")
            else:
                log(f"  epoch {epoch + 1}/{epochs}  step {done}/{steps}  loss {running:.4f}")
    bar.close()
    if done < steps:
        raise RuntimeError(f"the data ended after {done} of {steps} batches in epoch {epoch + 1}")
    sums.check(epoch)
    out = sums.means(steps)
    seconds = time.perf_counter() - start
    out["images_per_s"] = steps * batch_size / max(seconds, 1e-9)  # global images (all workers)
    out["epoch_seconds"] = seconds
    return out


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch (the same formula as `epoch_batches`)."""
    return seed * 100_003 + epoch


def stream_steps(n_train: int, batch_size: int) -> int:
    """Optimisation steps per streamed epoch: full global batches of the training rows."""
    return n_train // batch_size


def stream_batches(shard: Any, batch_size: int, *, epoch: int, seed: int, world: int = 1,
                   shuffle_buffer: Optional[int] = None, pin_memory: bool = False) -> Iterable[Dict[str, torch.Tensor]]:
    """One epoch of this worker's batches from a Ray Data shard (`ray.train.get_dataset_shard("train")`):
    dicts of `image` (B, C, H, W) uint8 and `label` (B,), B = batch_size // world, shuffled in a local
    buffer (default: 8 batches, at least 2048 rows) seeded by (seed, epoch). `pin_memory` (a GPU worker):
    batches are pinned before their copy to the device."""
    per_worker = batch_size // world
    buffer = shuffle_buffer if shuffle_buffer is not None else max(8 * per_worker, 2048)
    return shard.iter_torch_batches(batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=buffer or None,
                                    local_shuffle_seed=epoch_seed(seed, epoch) if buffer else None,
                                    pin_memory=pin_memory)


def train_epoch_stream(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Dict[str, torch.Tensor]],
    *,
    epoch: int,
    epochs: int,
    steps: int,
    batch_size: int,
    lr: float,
    scale: float = 255.0,
    device: torch.device = torch.device("cpu"),
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    log: Optional[Callable[[str], None]] = None,
    progress: Optional[bool] = None,
    augment: Optional[Augment] = None,
    schedule: Schedule = Schedule(),
    seed: int = 0,
    rank: int = 0,
) -> Dict[str, float]:
    """`train_epoch` over streamed batches ({"image": uint8 (B,C,H,W), "label": (B,)}; image / scale is in [0,1]).

    Trains exactly `steps` batches (`stream_steps(n_train, batch_size)`: the same one-cycle schedule and step
    count on every worker, so DDP ranks stay in step); batches beyond them are read and dropped, so the
    shard's epoch completes. Returns mean loss, mean method metrics, images/s (global) and seconds.
    """
    if steps < 1:
        raise ValueError(f"an epoch of {steps} steps: the training set is smaller than one batch of {batch_size}")
    # uint8 travels to the device (4x fewer bytes), then becomes [0,1] floats there
    xy = ((b["image"].to(device, non_blocking=True).float().div_(scale), b["label"].long()) for b in batches)
    return _fit_batches(model, method, optimizer, xy, steps=steps, epoch=epoch, epochs=epochs, batch_size=batch_size,
                        lr=lr, device=device, amp_dtype=amp_dtype, channels_last=channels_last, log=log,
                        progress=progress, augment=augment, schedule=schedule, seed=seed, rank=rank)


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, pgd_steps: int, seed: int,
             batch_size: int = 500, norm: str = "Linf") -> Dict[str, float]:
    """Clean and PGD accuracy (`norm`, the training threat model; `pgd_steps` steps, labelled weaker than
    AutoAttack) on the validation set."""
    from ..attacks import ATTACKS, accuracy, robust_accuracy

    was = model.training
    model.eval()
    try:
        attack = ATTACKS.create("pgd", model=model, eps=eps, norm=norm, steps=pgd_steps, seed=seed)
        return {"val_clean_acc": accuracy(model, x, y, batch_size),
                f"val_pgd{pgd_steps}_acc": robust_accuracy(model, attack, x, y, batch_size)}
    finally:
        model.train(was)
