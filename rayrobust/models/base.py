"""The model contract every classifier keeps, the model registry, and `create_model`.

A `RobustModel` takes images in [0,1] and normalises inside, so attacks, clustering and
evaluation all work in pixel space:

    forward(x) = forward_head(forward_features(x))
    forward_features: (N, C, H, W) in [0,1] -> (N, num_features)   the latent the pipeline clusters
    forward_head:     (N, num_features)     -> (N, num_classes)    logits

Example:
    >>> model = create_model("small_cnn", num_classes=10, in_channels=1, input_size=28)
    >>> model(torch.rand(4, 1, 28, 28)).shape
    torch.Size([4, 10])
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..registry import Registry

MODELS: Registry["RobustModel"] = Registry("model")


class RobustModel(nn.Module):
    """Base class: holds the normalisation buffers and the features/head split.

    Subclasses build `self.head` (an `nn.Module` mapping the latent to logits) and implement
    `features(x_normalised) -> latent`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        input_size: int,
        num_features: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = input_size  # height = width, pixels
        self.num_features = num_features
        # (1, C, 1, 1) so they broadcast over NCHW and channels_last alike
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (N, C, H, W), [0,1] -> zero-mean, unit-std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))  # (N, num_features)

    def forward_head(self, latent: torch.Tensor) -> torch.Tensor:
        return self.head(latent)  # (N, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, in_channels={self.in_channels}, "
                f"input_size={self.input_size}, num_features={self.num_features}")


def require_input_size(model: str, input_size: int, expected: int, hint: str) -> None:
    """Raise a ConfigError naming the model, the size it needs and a dataset that has it."""
    if input_size != expected:
        raise ConfigError(
            f"model {model!r} expects {expected}x{expected} inputs, got {input_size}x{input_size}; "
            f"{hint}"
        )


def _channel_stats(name: str, values: Optional[Sequence[float]], in_channels: int,
                   default: float) -> Tuple[float, ...]:
    """Validate a per-channel mean or std; None means `default` for every channel."""
    if values is None:
        return (default,) * in_channels
    values = tuple(float(v) for v in values)
    if len(values) != in_channels:
        raise ConfigError(
            f"model {name} has {len(values)} values {values} but the input has {in_channels} "
            f"channels; pass one value per channel (the dataset's `mean`/`std`)"
        )
    return values


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **kwargs: Any,
) -> RobustModel:
    """Build a registered model; `mean`/`std` are per-channel [0,1]-scale statistics (default 0.5).

    Extra keyword arguments go to the model's constructor (e.g. `width1=` for small_cnn).
    """
    factory = MODELS.get(name)  # unknown name -> ConfigError listing the valid ones
    if num_classes < 2:
        raise ConfigError(f"num_classes={num_classes} must be >= 2")
    if in_channels < 1:
        raise ConfigError(f"in_channels={in_channels} must be >= 1")
    mean = _channel_stats("mean", mean, in_channels, 0.5)
    std = _channel_stats("std", std, in_channels, 0.5)
    if any(s <= 0 for s in std):
        raise ConfigError(f"model std {std} must be positive in every channel")
    return factory(num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                   mean=mean, std=std, **kwargs)


def list_models() -> List[str]:
    return MODELS.names()
