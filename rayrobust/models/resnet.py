"""The two standard robustness-benchmark networks for 32x32 inputs (CIFAR-10/100).

- `preact_resnet18`: PreActResNet-18 as in Wong et al. "Fast is better than free" and
  Rice et al. "Overfitting in adversarially robust deep learning"; latent 512.
- `wrn_34_10`: WideResNet-34-10 as in the Madry-lab and TRADES code; latent 640.

Both keep the reference layouts (bias-free 3x3 convs, 1x1 projection shortcuts, final
BN-ReLU + global average pool), so published hyperparameters transfer. `in_channels` may be
anything; the input must be 32x32.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import MODELS, RobustModel, require_input_size

INPUT_SIZE = 32  # pixels; both networks downsample 32 -> 4 (PreAct) or 32 -> 8 (WRN)
SIZE_HINT = "use cifar10, cifar100 or imagefolder with image_size=32 (small_cnn fits fashion_mnist)"


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


# ---------------------------------------------------------------------------------------------
# PreActResNet-18
# ---------------------------------------------------------------------------------------------
class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; the shortcut projects the pre-activated input when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))  # (N, c_in, H, W)
        skip = x if self.shortcut is None else self.shortcut(out)  # (N, c_out, H/s, W/s)
        out = self.conv1(out)  # (N, c_out, H/s, W/s)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(RobustModel):
    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 blocks: Sequence[int] = (2, 2, 2, 2), name: str = "preact_resnet18"):
        require_input_size(name, input_size, INPUT_SIZE, SIZE_HINT)
        widths = (64, 128, 256, 512)
        super().__init__(num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                         num_features=widths[-1], mean=mean, std=std)
        self.conv1 = conv3x3(in_channels, widths[0])
        layers, c_in = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            for j in range(n):
                layers.append(PreActBlock(c_in, width, stride if j == 0 else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.conv1(x))  # (N, 512, 4, 4)
        h = F.relu(self.bn(h))
        return F.adaptive_avg_pool2d(h, 1).flatten(1)  # (N, 512)


@MODELS.register("preact_resnet18")
def preact_resnet18(**kwargs) -> PreActResNet:
    """PreActResNet-18 (11.2M params for CIFAR-10)."""
    return PreActResNet(**kwargs, blocks=(2, 2, 2, 2), name="preact_resnet18")


# ---------------------------------------------------------------------------------------------
# WideResNet-34-10
# ---------------------------------------------------------------------------------------------
class WideBlock(nn.Module):
    """Pre-activation wide block. When the width changes, the shortcut (a 1x1 conv) and the main
    path both start from the pre-activated input, as in the Madry/TRADES code."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.drop_rate = drop_rate
        self.shortcut = None
        if c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))  # (N, c_in, H, W)
        skip = x if self.shortcut is None else self.shortcut(pre)  # (N, c_out, H/s, W/s)
        out = F.relu(self.bn2(self.conv1(pre)))  # (N, c_out, H/s, W/s)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return skip + self.conv2(out)


class WideResNet(RobustModel):
    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 depth: int = 34, widen_factor: int = 10, drop_rate: float = 0.0,
                 name: str = "wrn_34_10"):
        require_input_size(name, input_size, INPUT_SIZE, SIZE_HINT)
        assert (depth - 4) % 6 == 0, "WideResNet depth must be 6n+4"
        n = (depth - 4) // 6  # blocks per stage: 5 for depth 34
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)  # 16/160/320/640
        super().__init__(num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                         num_features=widths[-1], mean=mean, std=std)
        self.conv1 = conv3x3(in_channels, widths[0])
        layers, c_in = [], widths[0]
        for stage, width in enumerate(widths[1:]):
            stride = 1 if stage == 0 else 2
            for j in range(n):
                layers.append(WideBlock(c_in, width, stride if j == 0 else 1, drop_rate))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference init: He-normal convs (fan-out), unit BN, zero Linear bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.conv1(x))  # (N, 640, 8, 8)
        h = F.relu(self.bn(h))
        return F.adaptive_avg_pool2d(h, 1).flatten(1)  # (N, 640)


@MODELS.register("wrn_34_10")
def wrn_34_10(**kwargs) -> WideResNet:
    """WideResNet-34-10 (46.2M params for CIFAR-10)."""
    return WideResNet(**{"drop_rate": 0.0, **kwargs}, depth=34, widen_factor=10, name="wrn_34_10")
