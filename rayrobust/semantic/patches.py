"""High/low frequency split and patch (un)folding, all differentiable torch ops (docs/methods.md §1.4).

    x_low  = GaussianBlur(x, sigma_b)     depthwise conv, reflect padding, radius ceil(3 sigma)
    x_high = x - x_low
    patches(x_high, p, stride)  (N, C, H, W) -> (N, L, C*p*p)   L patches per image
    fold(patches, ...)          (N, L, C*p*p) -> (N, C, H, W)  overlapping pixels averaged

Images whose size does not fit a whole number of strides are reflect-padded on the bottom/right
before cutting and cropped after folding, so every pixel is covered by at least one patch.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, radius ceil(3 sigma): (2r+1,)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), reflect padding (replicate when the image is too small)."""
    k = gaussian_kernel1d(sigma, x.device, x.dtype)
    r = len(k) // 2
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    h = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(h, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def split_frequencies(x: torch.Tensor, sigma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_low, x_high) with x_low = blur(x), x_high = x - x_low; both (N, C, H, W)."""
    low = gaussian_blur(x, sigma)
    return low, x - low


def _pad_amount(size: int, p: int, stride: int) -> int:
    """Pixels to add so that (size + pad - p) is a multiple of stride."""
    if size < p:
        return p - size
    return (-(size - p)) % stride


def patches(x: torch.Tensor, p: int, stride: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, C*p*p) patches in raster order (channel-major inside a patch)."""
    ph, pw = _pad_amount(x.shape[-2], p, stride), _pad_amount(x.shape[-1], p, stride)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    cols = F.unfold(x, kernel_size=p, stride=stride)  # (N, C*p*p, L)
    return cols.transpose(1, 2)


def fold(patch_rows: torch.Tensor, shape: Tuple[int, int, int], p: int, stride: int) -> torch.Tensor:
    """Inverse of `patches`: (N, L, C*p*p) -> (N, C, H, W), each pixel the mean of the patches covering it."""
    c, h, w = shape
    ph, pw = _pad_amount(h, p, stride), _pad_amount(w, p, stride)
    size = (h + ph, w + pw)
    cols = patch_rows.transpose(1, 2)  # (N, C*p*p, L)
    total = F.fold(cols, size, kernel_size=p, stride=stride)  # (N, C, H', W')
    ones = torch.ones(1, c * p * p, cols.shape[-1], device=cols.device, dtype=cols.dtype)
    cover = F.fold(ones, size, kernel_size=p, stride=stride)  # (1, C, H', W') patches per pixel
    return (total / cover)[..., :h, :w]

