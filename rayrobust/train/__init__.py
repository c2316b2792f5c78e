"""Training: the plain loop (`loop`, no Ray) and its Ray Train wrapper (`ray_train.fit`).

Names are imported lazily, so `rayrobust.train.loop` loads without the Ray Train wrapper.
"""
from importlib import import_module

_EXPORTS = {"fit": "ray_train", "TrainResult": "ray_train"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
