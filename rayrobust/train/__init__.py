"""Training: the plain loop (`loop`) and its Ray Train wrapper (`ray_train.fit`)."""
from .ray_train import fit, TrainResult

__all__ = ["fit", "TrainResult"]
