"""The method interface and its registry."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..registry import Registry

METHODS: Registry["Method"] = Registry("method")


class Method:
    """A training objective, plus (where it changes inference) the decision function to attack."""

    name = "method"
    adversarial = False  # True when training generates adversarial examples

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        raise NotImplementedError

    def decision(self, model: nn.Module) -> nn.Module:
        return model


def create_method(name: str, **kwargs: Any) -> Method:
    return METHODS.create(name, **kwargs)


def list_methods() -> List[str]:
    return METHODS.names()
