"""Small CNNs cheap enough for PGD adversarial training on 2 CPU cores (the Fashion-MNIST demo).

No BatchNorm: the output is a deterministic function of the input in train and eval mode alike,
which keeps attacks and latent extraction simple.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import MODELS, RobustModel

MIN_INPUT_SIZE = 8  # pixels; two 2x2 max-pools leave at least a 2x2 map


class SmallCNN(RobustModel):
    """conv5-ReLU-pool2 -> conv5-ReLU-pool2 -> Linear-ReLU (latent) -> Linear (logits).

    The first Linear's input size follows `input_size` (32*7*7 for 28x28 inputs), so any
    square input of at least 8 pixels works: 28 (Fashion-MNIST), 32 (CIFAR), 8 (digits).
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 width1: int = 16, width2: int = 32, latent: int = 100, name: str = "small_cnn"):
        if input_size < MIN_INPUT_SIZE:
            raise ConfigError(
                f"model {name!r} needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, "
                f"got {input_size}x{input_size}; use fashion_mnist (28), cifar10 (32) or digits (8)"
            )
        super().__init__(num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                         num_features=latent, mean=mean, std=std)
        side = input_size // 4  # spatial size after two 2x2 max-pools: 28 -> 7
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width1, width2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Linear(width2 * side * side, latent), nn.ReLU())
        self.head = nn.Linear(latent, num_classes)
        # channels_last weights and activations: the same function (up to float rounding), but oneDNN's
        # convolutions and max-pooling run about twice as fast on CPU (bench/model_forward.py).
        # State dicts load into it from either layout.
        self.conv.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.contiguous(memory_format=torch.channels_last))  # (N, width2, H/4, W/4)
        return self.fc(h.flatten(1))  # (N, latent)


@MODELS.register("small_cnn")
def small_cnn(**kwargs) -> SmallCNN:
    """16/32 conv channels, 100-d latent: the CPU demo model (~0.17M params for 28x28)."""
    return SmallCNN(**{"width1": 16, "width2": 32, "latent": 100, **kwargs}, name="small_cnn")


@MODELS.register("tiny_cnn")
def tiny_cnn(**kwargs) -> SmallCNN:
    """4/8 conv channels, 16-d latent (~7.4K params for 28x28): a smoke-test model whose compute is negligible,
    for checking a cluster's data and storage path end to end (an epoch of 130,000 32x32 images: ~25 s on one core)."""
    return SmallCNN(**{"width1": 4, "width2": 8, "latent": 16, **kwargs}, name="tiny_cnn")


@MODELS.register("small_cnn_wide")
def small_cnn_wide(**kwargs) -> SmallCNN:
    """32/64 conv channels, 256-d latent (~0.86M params for 28x28)."""
    return SmallCNN(**{"width1": 32, "width2": 64, "latent": 256, **kwargs}, name="small_cnn_wide")
