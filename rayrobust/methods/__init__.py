"""Training methods behind one interface (METHODS.md §0).

A method is an object with `loss(model, x, y) -> (loss, metrics)` and `decision(model) -> nn.Module`,
the attackable decision function (the model itself for methods that do not change inference).
Create one by name: `create_method("pgd_at", eps=0.1, steps=7)`.
"""
from .base import METHODS, Method, create_method, list_methods
from . import baselines  # noqa: F401  (registers the baselines)

__all__ = ["METHODS", "Method", "create_method", "list_methods"]
