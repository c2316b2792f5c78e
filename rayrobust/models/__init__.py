"""Image classifiers behind one contract (`RobustModel`) and one registry (`MODELS`).

Importing this package registers every model: tiny_cnn, small_cnn, small_cnn_wide, preact_resnet18, wrn_34_10.
"""
from .base import MODELS, RobustModel, create_model, list_models
from . import cnn, resnet  # noqa: F401  (registers the models)
from .cnn import SmallCNN
from .resnet import PreActResNet, WideResNet

__all__ = ["MODELS", "RobustModel", "create_model", "list_models", "SmallCNN", "PreActResNet",
           "WideResNet"]
