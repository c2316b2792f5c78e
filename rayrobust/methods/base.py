"""The method interface, its per-method settings and its registry."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..registry import Registry

METHODS: Registry["Method"] = Registry("method")

# What every method may take from the training config besides its own settings; a method's constructor
# declares the ones it uses (keyword-only) and is given only those.
COMMON_ARGS = ("num_classes", "seed", "eps", "steps", "norm", "attack_step")


@dataclasses.dataclass
class MethodSettings:
    """A method's own settings (`train.method_args.<method>` in a config): a dataclass per method, validated in
    its `__post_init__` with ConfigErrors that name the field. This base has no fields (methods without
    settings of their own)."""


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

    Construction: `__init__(self, settings=None, *, <common arguments it uses>)`, where `settings` is an instance
    of the class's `Settings` dataclass (its own options, `train.method_args.<name>` in a config) and the common
    arguments are those of `COMMON_ARGS` (num_classes, seed, eps, steps, norm, attack_step) it declares.
    `create_method` validates the settings and passes only the declared common arguments.

    Capabilities (class attributes, read by the pipeline, the evaluation and the Ray Train driver) are
    declared below with their defaults.
    """

    name = "method"
    Settings = MethodSettings  # this method's own settings (a MethodSettings dataclass): train.method_args.<name>
    adversarial = False  # training generates adversarial examples (train.eps / train.norm apply)
    purifies = False  # the decision function purifies its input: evaluated adaptively (BPDA + non-adaptive too)
    certifiable = False  # `rayrobust.certify` applies: the evaluation adds the certificate and its attack check
    needs_semantic = False  # trained after a pipeline's semantic stages (extract, cluster, dictionaries)

    def __init__(self, settings: Optional[MethodSettings] = None):
        self.settings = settings if settings is not None else self.Settings()

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


def settings_class(name: str) -> type:
    """The settings dataclass of registered method `name`."""
    return METHODS.get(name).Settings


def method_settings(name: str, raw: Optional[Mapping[str, Any]] = None) -> MethodSettings:
    """`raw` (a mapping, e.g. `train.method_args.<name>`) as method `name`'s validated settings. An unknown key
    is a ConfigError naming the valid ones and the closest; a bad value one naming the key and the fix."""
    from ..config import coerce_field
    from ..errors import ConfigError

    cls = settings_class(name)
    if isinstance(raw, cls):
        return raw
    where = f"train.method_args.{name}"
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must map setting names to values, got {raw!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (raw or {}).items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listed = ", ".join(valid) if valid else f"none: {name} has no settings of its own"
            raise ConfigError(f"unknown config key '{where}.{key}'{hint}; valid keys in {where}: {listed}")
        kwargs[key] = coerce_field(cls, key, value, where=where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def create_method(name: str, settings: Optional[Mapping[str, Any] | MethodSettings] = None, **kwargs: Any) -> Method:
    """Method `name` with its settings (a mapping or its Settings; keys may also be given as keyword arguments)
    and the common arguments (`COMMON_ARGS`) its constructor takes; the others are not passed."""
    cls = METHODS.get(name)
    common = {k: kwargs.pop(k) for k in COMMON_ARGS if k in kwargs}
    if isinstance(settings, MethodSettings):
        if kwargs:
            settings = {**dataclasses.asdict(settings), **kwargs}
    else:
        settings = {**(settings or {}), **kwargs}
    params = inspect.signature(cls.__init__).parameters
    return cls(settings=method_settings(name, settings), **{k: v for k, v in common.items() if k in params})


def method_kwargs(train: Any) -> Dict[str, Any]:
    """create_method's arguments from a TrainConfig (or its dict, as stored in a checkpoint): the common arguments
    (`attack_steps` is passed as `steps`) and `settings`, the method's `train.method_args` entry."""
    from ..config import TrainConfig, migrate_train_dict

    if isinstance(train, TrainConfig):
        raw = dataclasses.asdict(train)
    else:
        raw = migrate_train_dict(dict(train))
    args = {"seed": raw.get("seed", 0), "eps": raw.get("eps", 0.1), "steps": raw.get("attack_steps", 7),
            "norm": raw.get("norm", "Linf"), "attack_step": raw.get("attack_step")}
    return {**args, "settings": dict((raw.get("method_args") or {}).get(raw.get("method"), {}))}


def list_methods() -> List[str]:
    return METHODS.names()
