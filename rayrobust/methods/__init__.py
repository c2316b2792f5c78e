"""Training methods behind one interface (docs/methods.md §0.1).

A method is an object with `loss(model, x, y) -> (loss, metrics)` and `decision(model) -> nn.Module`,
the attackable decision function (the model itself for methods that do not change inference).
Create one by name: `create_method("drp_at", eps=0.1, steps=7, margin=0.3)`, or from a TrainConfig:
`create_method(tc.method, **method_kwargs(tc))` (the common arguments and the method's own settings,
`train.method_args.<method>`, a `Method.Settings` dataclass).
"""
from .base import METHODS, Method, create_method, list_methods, method_kwargs
from . import baselines  # noqa: F401  (registers the baselines)
from . import drp  # noqa: F401  (registers drp, drp_at)
from . import spat  # noqa: F401  (registers spat)
from . import clustr  # noqa: F401  (registers clustr, clustr_qtrades)
from . import saturated  # noqa: F401  (registers saturated, a gradient-masking control)
from . import srd  # noqa: F401  (registers srd: latent-constrained AT + purification)

__all__ = ["METHODS", "Method", "create_method", "list_methods", "method_kwargs"]
