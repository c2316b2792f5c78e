"""Training augmentation: random crop (pad, then crop back to H x W) + horizontal flip, the standard CIFAR
augmentation of adversarial-training papers (torchvision `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`).

Seeded, not drawn from a global RNG: the offsets and flips of a batch come from a CPU generator seeded by
(seed, epoch, step, rank), so the same (seed, epoch, step) gives the same batch on any device and a run
resumed from an epoch checkpoint replays the uninterrupted one exactly. The random numbers are drawn on the
CPU (a few bytes per image); the crop and flip run on the device the batch lives on (one gather).

    >>> aug = Augment(pad=4, padding="zeros")
    >>> x_aug = aug(x, seed=0, epoch=3, step=17)      # (N,C,H,W) in [0,1], on x's device
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

PADDINGS = ("zeros", "reflect")


def augment_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The generator seed of one worker's batch: distinct per (seed, epoch, step, rank)."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1_009 + rank


@dataclass(frozen=True)
class Augment:
    """Random crop after `pad` pixels of `padding` ("zeros" or "reflect") on every side, and a horizontal
    flip with probability 1/2, per image."""

    pad: int = 4
    padding: str = "zeros"
    flip: bool = True

    def __post_init__(self) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"padding={self.padding!r} is unknown; use 'zeros' or 'reflect'")
        if self.pad < 0:
            raise ValueError(f"pad={self.pad} must be >= 0")

    def describe(self) -> str:
        return f"random crop (pad {self.pad}, {self.padding}) + horizontal flip"

    def draws(self, n: int, *, seed: int, epoch: int, step: int, rank: int = 0):
        """(rows, cols, flips): per-image crop offsets in [0, 2*pad] and flip decisions, drawn on the CPU."""
        g = torch.Generator().manual_seed(augment_seed(seed, epoch, step, rank))
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        return offsets[0], offsets[1], flips

    def __call__(self, x: torch.Tensor, *, seed: int, epoch: int, step: int, rank: int = 0,
                 draws: Optional[tuple] = None) -> torch.Tensor:
        """The augmented batch x (N,C,H,W), computed on x's device; x itself is not changed."""
        n, _, h, w = x.shape
        rows, cols, flips = draws if draws is not None else self.draws(n, seed=seed, epoch=epoch, step=step, rank=rank)
        dev = x.device
        rows, cols, flips = rows.to(dev, non_blocking=True), cols.to(dev, non_blocking=True), flips.to(dev, non_blocking=True)
        p = self.pad
        padded = F.pad(x, (p, p, p, p), mode="reflect" if self.padding == "reflect" else "constant") if p else x
        r = rows.view(n, 1) + torch.arange(h, device=dev).view(1, h)  # (N, H) source rows
        c = cols.view(n, 1) + torch.arange(w, device=dev).view(1, w)  # (N, W) source columns
        c = torch.where(flips.view(n, 1), c.flip(1), c)  # a flipped image reads its columns right to left
        batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
        channel = torch.arange(x.shape[1], device=dev).view(1, -1, 1, 1)
        return padded[batch, channel, r.view(n, 1, h, 1), c.view(n, 1, 1, w)]
