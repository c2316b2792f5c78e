"""The method interface and its registry."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..registry import Registry

METHODS: Registry["Method"] = Registry("method")


class Method:
    """A training objective, plus (where it changes inference) the decision function to attack.

    Optional hooks (defaults suit methods that train an ordinary classifier):
    - `output_dim(num_classes)`: the model's output width (DRP: the prototype dimension).
    - `fit(x_train, y_train)`: data-level preparation, called once before training (SPAT's weight map).
    - `begin_epoch(model, x_train, y_train, epoch, device)`: model-level preparation for epoch `epoch`
      from the current weights (ClusTR's per-epoch clusters). The Ray Train worker calls it before
      its first epoch and after every epoch's training (for the next epoch, before validation and
      the checkpoint), so each checkpoint's method state matches its weights. Must be deterministic
      given the weights, `epoch` and the method's seed: a resumed run recomputes it.
    - `state_dict()` / `load_state_dict(state)`: what the method learned or generated outside the
      model (prototypes, weight maps), plain tensors only; saved in every checkpoint under
      `method_state` and restored before evaluation.
    - `prepare_run(cfg)` (class method): driver-side preparation before Ray Train starts (SRD: its purifier
      state and initial weights from the run's semantic stages).

    Capabilities (class attributes, read by the pipeline, the evaluation and the Ray Train driver) are
    declared below with their defaults.
    """

    name = "method"
    adversarial = False  # training generates adversarial examples (train.eps / train.norm apply)
    purifies = False  # the decision function purifies its input: evaluated adaptively (BPDA + non-adaptive too)
    certifiable = False  # `rayrobust.certify` applies: the evaluation adds the certificate and its attack check
    needs_semantic = False  # trained after a pipeline's semantic stages (extract, cluster, dictionaries)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """(scalar loss with gradient, metrics): metric values are detached 0-d tensors on the batch's device
        (or floats), so a training step needs no host-device sync; the loop averages them once per epoch."""
        raise NotImplementedError

    def decision(self, model: nn.Module) -> nn.Module:
        return model

    def output_dim(self, num_classes: int) -> int:
        return num_classes

    def fit(self, x_train: torch.Tensor, y_train: torch.Tensor) -> None:
        return None

    def begin_epoch(self, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, epoch: int,
                    device: torch.device = torch.device("cpu")) -> None:
        return None

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        return None

    @classmethod
    def prepare_run(cls, cfg: Any) -> Optional[Dict[str, Any]]:
        """What the Ray Train driver hands every worker before training ({"method_state", "model", ...}); None
        (the default) when the method starts from scratch."""
        return None


def create_method(name: str, **kwargs: Any) -> Method:
    return METHODS.create(name, **kwargs)


def method_kwargs(train: Any) -> Dict[str, Any]:
    """Every option of a TrainConfig (dataclass or its dict) as method keyword arguments.

    Methods take what they need and ignore the rest (`**_`), so a new TrainConfig field reaches the
    methods without special cases. `attack_steps` and `trades_beta` are also passed under the
    baselines' names `steps` and `beta`.
    """
    raw = dataclasses.asdict(train) if dataclasses.is_dataclass(train) else dict(train)
    raw.pop("method", None)
    if "attack_steps" in raw:
        raw["steps"] = raw["attack_steps"]
    if "trades_beta" in raw:
        raw["beta"] = raw["trades_beta"]
    return raw


def list_methods() -> List[str]:
    return METHODS.names()
