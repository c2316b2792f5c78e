"""Experiment configuration: one validated dataclass per stage, composed into `ExperimentConfig`.

Values come from YAML files in `configs/` and `--set section.key=value` overrides. Every field
states its unit; every check names the field, the value and the fix.

Example:
    >>> cfg = load_config("configs/demo.yaml", overrides=["train.epochs=1", "eval.eps=0.2"])
    >>> cfg.train.epochs
    1
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, get_type_hints

import yaml

from .errors import ConfigError
from .semantic.config import SemanticConfig
from .tune.config import TuneConfig


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


NORMS = ("Linf", "L2")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand")  # rand: EOT, for randomized models
LR_SCHEDULES = ("one_cycle", "piecewise")
AUGMENT_PADDING = ("zeros", "reflect")
# Image shapes (C, H, W) of the built-in datasets: an L2 budget is checked against their diameter and
# `data.augment: null` is resolved for them when the config is read (other datasets: when their images load).
KNOWN_SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "digits": (1, 8, 8)}


def _check_eps(name: str, value: float, norm: str = "Linf") -> None:
    if norm == "L2":
        _check(value > 0, f"{name}={value} must be > 0: an L2 budget in [0,1] pixel units (e.g. 0.5 on CIFAR-10)")
        return
    _check(
        0.0 < value <= 1.0,
        f"{name}={value} is outside (0, 1]: budgets are in [0,1] pixel units (e.g. 0.1 for Fashion-MNIST, 0.0314 for 8/255)",
    )


def input_diameter(shape) -> float:
    """The L2 distance between an all-black and an all-white image of shape (C, H, W): sqrt(C*H*W)."""
    c, h, w = shape
    return float(c * h * w) ** 0.5


def check_budget(name: str, eps: float, norm: str, shape=None) -> None:
    """A ConfigError when `eps` is not a usable `norm` budget ([0,1] pixel units) for images of `shape`:
    L-inf in (0, 1]; L2 in (0, sqrt(C*H*W)] (no L2 perturbation of a [0,1] image is longer)."""
    norm_key = name.rsplit(".", 1)[0] + ".norm" if "." in name else "norm"
    _check(norm in NORMS, f"{norm_key}={norm!r} is unknown; use 'Linf' or 'L2'")
    _check_eps(name, eps, norm)
    if norm == "L2" and shape is not None:
        d = input_diameter(shape)
        _check(eps <= d, f"{name}={eps} is larger than the diameter {d:.4g} of the {'x'.join(map(str, shape))} "
                         f"input space (sqrt(C*H*W)): no L2 perturbation is that long; use an eps <= {d:.4g} "
                         f"(e.g. 0.5 on CIFAR-10, 3.0 on ImageNet)")


def resolve_augment(augment: Optional[bool], shape) -> bool:
    """`data.augment` in force: null (auto) means on for 32x32 images (random crop + flip), off otherwise."""
    if augment is not None:
        return bool(augment)
    return tuple(shape[1:]) == (32, 32)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # dataset registry name (see `rayrobust.data.DATASETS`)
    root: Optional[str] = None  # directory with the files; None = $RAYROBUST_DATA, system package, or ./data
    download: bool = False  # allow torchvision to download when files are missing
    train_limit: Optional[int] = None  # use only the first N training images (None = all)
    val_size: int = 500  # images held out of training for per-epoch validation
    # Stream the training images from Ray Data (read by the workers, never loaded on the driver) instead of
    # loading the split into every training worker. Always on for `parquet` datasets (docs/data.md).
    stream: bool = False
    # Training augmentation: random crop (pad `augment_pad`, `augment_padding`) + horizontal flip, seeded by
    # (seed, epoch, step, rank) and applied on the batch's device. null = auto: on for 32x32 images, off for
    # others (28x28 Fashion-MNIST, 8x8 digits); resolved when the config is read for built-in datasets.
    augment: Optional[bool] = None
    augment_pad: int = 4  # pixels of padding before the random 32x32 (HxW) crop
    augment_padding: str = "zeros"  # zeros (torchvision RandomCrop(padding=4), as Rice et al.) or reflect

    def __post_init__(self) -> None:
        if self.augment is None and self.name in KNOWN_SHAPES:
            self.augment = resolve_augment(None, KNOWN_SHAPES[self.name])
        _check(self.augment_pad >= 0, f"data.augment_pad={self.augment_pad} must be >= 0 (4 for CIFAR)")
        _check(self.augment_padding in AUGMENT_PADDING,
               f"data.augment_padding={self.augment_padding!r} is unknown; use 'zeros' or 'reflect'")
        _check(self.train_limit is None or self.train_limit > 0, f"data.train_limit={self.train_limit} must be a positive integer or null")
        _check(self.val_size >= 0, f"data.val_size={self.val_size} must be >= 0")
        if self.name == "parquet":
            _check(bool(self.root), "data.name=parquet needs data.root=<directory or URI (s3://..., gs://...) holding "
                                    "meta.json and <split>/*.parquet>; see docs/data.md")
        if self.root and "://" in self.root:
            from .location import check_syntax

            check_syntax(self.root)
            _check(self.name in ("parquet", "imagefolder"),
                   f"data.root={self.root!r} is a URI; only data.name=parquet or imagefolder read from object storage "
                   f"(export {self.name} with `rayrobust export-data --out URI` and use data.name=parquet)")

    @property
    def streamed(self) -> bool:
        """Whether training reads the images as a Ray Dataset (parquet, URI image folders, data.stream)."""
        return self.stream or self.name == "parquet" or bool(self.root and "://" in self.root)


@dataclass
class ModelConfig:
    name: str = "small_cnn"  # model registry name (see `rayrobust.models.MODELS`)


def _check_method_args(raw: Any) -> Dict[str, Dict[str, Any]]:
    """train.method_args validated: registered method names, each entry that method's settings (unknown keys and
    bad values are one-line ConfigErrors); returns the entries with their values coerced to the declared types."""
    from .methods.base import METHODS, method_settings

    _check(isinstance(raw, dict), f"train.method_args must map method names to their settings, e.g. "
                                  f"{{drp: {{margin: 0.5}}}}; got {raw!r}")
    out = {}
    for name, values in raw.items():
        if name not in METHODS.names():
            raise _unknown_key(f"train.method_args.{name}", METHODS.names(), "train.method_args (method names)")
        settings = method_settings(name, values)
        out[name] = {k: getattr(settings, k) for k in (values or {})}
    return out


# Flat train keys of earlier versions -> where they live now: ((method, setting), ...). Read from old configs and
# checkpoints (`migrate_train_dict`); new configs write train.method_args.<method>.<setting>.
LEGACY_TRAIN_KEYS: Dict[str, tuple] = {
    "trades_beta": (("trades", "beta"),),
    "repulsion_margin": (("drp", "margin"), ("drp_at", "margin")),
    "drp_beta": (("drp", "beta"), ("drp_at", "beta")),
    "drp_dim": (("drp", "dim"), ("drp_at", "dim")),
    "spat_weights": (("spat", "weights"),),
    "spat_w_min": (("spat", "w_min"),),
    "clustr_k": (("clustr", "k"), ("clustr_qtrades", "k")),
    "clustr_alpha": (("clustr", "alpha"), ("clustr_qtrades", "alpha")),
    "qtrades_weight": (("clustr_qtrades", "weight"),),
    "saturation_scale": (("saturated", "scale"),),
    "srd_lambda": (("srd", "latent_weight"),),
    "srd_fista_iters": (("srd", "fista_iters"),),
}


def migrate_train_dict(train: Dict[str, Any]) -> Dict[str, Any]:
    """A train section with the flat per-method keys of earlier versions moved into `method_args` (an entry
    given there already wins); other keys are left as they are."""
    legacy = [k for k in train if k in LEGACY_TRAIN_KEYS]
    if not legacy:
        return train
    train = dict(train)
    args = {m: dict(v or {}) for m, v in (train.get("method_args") or {}).items()}
    for key in legacy:
        value = train.pop(key)
        for method, setting in LEGACY_TRAIN_KEYS[key]:
            args.setdefault(method, {}).setdefault(setting, value)
    train["method_args"] = args
    return train


@dataclass
class TrainConfig:
    method: str = "pgd_at"  # method registry name (see `rayrobust.methods.METHODS`)
    epochs: int = 3
    batch_size: int = 128  # global batch, split across Ray Train workers
    lr: float = 0.05  # SGD learning rate for the global batch: the one-cycle peak, or the piecewise start
    lr_schedule: str = "one_cycle"  # one_cycle (linear warm-up 30%, linear decay) or piecewise (x lr_decay at lr_milestones)
    lr_milestones: List[int] = field(default_factory=lambda: [100, 150])  # piecewise: epochs after which lr decays
    lr_decay: float = 0.1  # piecewise: factor at each milestone
    momentum: float = 0.9
    nesterov: bool = True  # Nesterov momentum (Rice et al.'s recipe uses plain momentum: false)
    weight_decay: float = 5e-4
    eps: float = 0.1  # training budget in [0,1] pixel units, in `norm`
    norm: str = "Linf"  # Linf or L2: the threat model every adversarial training method attacks in
    # Early stopping (Rice et al. 2020): evaluate the epoch with the best validation PGD accuracy, not the last
    early_stopping: bool = False
    attack_steps: int = 7  # PGD steps for pgd_at / trades (step 2.5*eps/steps)
    attack_step: Optional[float] = None  # pgd_at / trades PGD step size in [0,1] pixel units (None = 2.5*eps/attack_steps)
    num_workers: int = 1  # Ray Train workers
    use_gpu: Optional[bool] = None  # None = use GPUs when the cluster has them
    cpus_per_worker: int = 1  # CPUs reserved per worker; torch uses this many threads
    amp: bool = False  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = False  # NHWC memory format (faster convolutions on recent GPUs)
    max_failures: int = 2  # Ray Train restarts the run from the latest checkpoint this many times
    val_pgd_steps: int = 10  # PGD steps of the per-epoch validation attack
    seed: int = 0
    # Each method's own settings, by method name (e.g. {drp: {margin: 0.5}, clustr: {k: 2}}): the fields of that
    # method's Settings dataclass (docs/methods.md lists them); a method without an entry uses its defaults.
    method_args: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs={self.epochs} must be >= 1")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _check(self.lr > 0, f"train.lr={self.lr} must be > 0")
        _check(self.norm in NORMS, f"train.norm={self.norm!r} is unknown; use 'Linf' or 'L2'")
        _check_eps("train.eps", self.eps, self.norm)
        _check(self.lr_schedule in LR_SCHEDULES,
               f"train.lr_schedule={self.lr_schedule!r} is unknown; use 'one_cycle' or 'piecewise'")
        _check(all(m >= 1 for m in self.lr_milestones) and list(self.lr_milestones) == sorted(set(self.lr_milestones)),
               f"train.lr_milestones={self.lr_milestones} must be increasing epochs >= 1 (e.g. [100, 150])")
        _check(0 < self.lr_decay <= 1, f"train.lr_decay={self.lr_decay} must be in (0, 1] (e.g. 0.1)")
        _check(self.attack_steps >= 1, f"train.attack_steps={self.attack_steps} must be >= 1")
        _check(self.attack_step is None or self.attack_step > 0,
               f"train.attack_step={self.attack_step} must be > 0, or null for 2.5*eps/attack_steps")
        _check(self.num_workers >= 1, f"train.num_workers={self.num_workers} must be >= 1")
        _check(self.cpus_per_worker >= 1, f"train.cpus_per_worker={self.cpus_per_worker} must be >= 1")
        _check(self.max_failures >= 0, f"train.max_failures={self.max_failures} must be >= 0")
        _check(self.batch_size >= self.num_workers, f"train.batch_size={self.batch_size} must be >= train.num_workers={self.num_workers}")
        self.method_args = _check_method_args(self.method_args)


@dataclass
class EvalConfig:
    eps: float = 0.1  # evaluation budget in [0,1] pixel units, in `norm`
    norm: str = "Linf"  # Linf or L2
    autoattack_version: str = "standard"  # standard, plus, or rand (EOT; chosen anyway for a random model)
    n_eval: int = 1000  # test images for clean and PGD accuracy
    n_autoattack: int = 200  # the first n of those images also get AutoAttack (0 = skip, labelled)
    pgd_steps: int = 20
    pgd_restarts: int = 1
    batch_size: int = 250
    num_shards: int = 2  # Ray actors sharing AutoAttack by example (one GPU each when available)
    chunk_size: int = 100  # examples per AutoAttack chunk; results depend on it, not on num_shards
    checks: bool = True  # run the sanity checks and attach their flags
    seed: int = 0
    eot_samples: int = 1  # purifier defenses' BPDA attack: gradients averaged over this many calls (EOT)
    eps_curve: bool = True  # APGD-CE + APGD-T at eps/2, eps, 3eps/2, 2eps on the AutoAttack images (the report's curve)
    eps_curve_n: int = 0  # the curve on the first n AutoAttack images (whole chunks); 0 = all of them
    gallery: int = 8  # AutoAttack's adversarial examples kept for the report (0 = none)

    def __post_init__(self) -> None:
        _check(self.norm in NORMS, f"eval.norm={self.norm!r} is unknown; use 'Linf' or 'L2'")
        _check_eps("eval.eps", self.eps, self.norm)
        _check(self.autoattack_version in AUTOATTACK_VERSIONS,
               f"eval.autoattack_version={self.autoattack_version!r} is unknown; use one of: "
               f"{', '.join(AUTOATTACK_VERSIONS)} (rand: EOT, for randomized models)")
        _check(self.eot_samples >= 1, f"eval.eot_samples={self.eot_samples} must be >= 1 (1 is exact for a deterministic purifier)")
        _check(self.n_eval >= 1, f"eval.n_eval={self.n_eval} must be >= 1")
        _check(0 <= self.n_autoattack <= self.n_eval, f"eval.n_autoattack={self.n_autoattack} must be between 0 and eval.n_eval={self.n_eval}")
        _check(self.pgd_steps >= 1 and self.pgd_restarts >= 1, "eval.pgd_steps and eval.pgd_restarts must be >= 1")
        _check(self.num_shards >= 1, f"eval.num_shards={self.num_shards} must be >= 1")
        _check(self.chunk_size >= 1, f"eval.chunk_size={self.chunk_size} must be >= 1")
        _check(self.batch_size >= 1, f"eval.batch_size={self.batch_size} must be >= 1")
        _check(self.eps_curve_n >= 0, f"eval.eps_curve_n={self.eps_curve_n} must be >= 0 (0: all AutoAttack images)")
        _check(0 <= self.gallery <= 64, f"eval.gallery={self.gallery} must be between 0 and 64 (examples shown in the report)")


STORAGE_ENV = "RAYROBUST_STORAGE_PATH"  # the storage root of relative run_dirs on a cluster (cluster.yaml sets it)
PIPELINE_STAGES = ("train", "evaluate", "extract", "cluster", "dictionaries")


@dataclass
class ExperimentConfig:
    name: str = "default"
    run_dir: str = "runs/default"  # every artifact of the experiment goes under here
    methods: List[str] = field(default_factory=lambda: ["standard", "fgsm_rs", "pgd_at"])  # `pipeline` trains each
    stages: List[str] = field(default_factory=lambda: ["train", "evaluate"])  # what `pipeline` runs, in this order
    ray_address: Optional[str] = None  # None = connect to a running cluster if any, else start a local one
    # Where a relative run_dir lives: s3://bucket/prefix, gs://..., file:///...; None: $RAYROBUST_STORAGE_PATH
    # when set (cluster.yaml sets it), else the current directory. A run_dir that is a URI or absolute is used as is.
    storage_path: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)  # `rayrobust tune`: search space and budget
    seeds: List[int] = field(default_factory=lambda: [0])  # `rayrobust results` runs the pipeline once per seed
    # Per-method settings on top of the sections, e.g. {clustr: {train: {lr: 0.02}}, srd: {eval: {n_autoattack: 100}}}
    method_overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(len(self.methods) >= 1, "methods must list at least one method")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds),
               f"seeds={self.seeds} must list at least one seed, without repeats (e.g. [0, 1])")
        _check(isinstance(self.method_overrides, dict),
               f"method_overrides must map a method name to config sections, got {self.method_overrides!r}")
        for method, sections in self.method_overrides.items():
            _check(isinstance(sections, dict) and all(isinstance(v, dict) for v in sections.values()),
                   f"method_overrides.{method} must map sections to settings, e.g. {{train: {{lr: 0.02}}}}")
            for name, values in sections.items():
                _check(name in SECTIONS, f"method_overrides.{method}.{name}: unknown section; sections are: "
                                         f"{', '.join(SECTIONS)}")
                for key in values:
                    if key not in _valid_keys(SECTIONS[name]) and not (name == "train" and key in LEGACY_TRAIN_KEYS):
                        raise _unknown_key(f"method_overrides.{method}.{name}.{key}", _valid_keys(SECTIONS[name]), name)
                if name == "train":  # each method's settings are checked when the config is read, not when used
                    _check_method_args(migrate_train_dict(dict(values)).get("method_args") or {})
        from .location import check_syntax

        check_syntax(self.run_dir)
        if self.storage_path:
            check_syntax(self.storage_path)
        unknown = [s for s in self.stages if s not in PIPELINE_STAGES]
        _check(not unknown, f"stages={self.stages}: unknown stage(s) {unknown}; valid stages: {', '.join(PIPELINE_STAGES)}")
        _check(len(self.stages) >= 1, f"stages must list at least one of: {', '.join(PIPELINE_STAGES)}")
        shape = KNOWN_SHAPES.get(self.data.name)
        check_budget("train.eps", self.train.eps, self.train.norm, shape)
        check_budget("eval.eps", self.eval.eps, self.eval.norm, shape)

    def run_location(self) -> "Location":  # noqa: F821
        """run_dir as a Location: a URI or an absolute path as given; a relative path under storage_path
        (or $RAYROBUST_STORAGE_PATH) when one is set, else under the current directory."""
        import os

        from .location import Location

        root = self.storage_path or os.environ.get(STORAGE_ENV) or None
        if root and "://" not in self.run_dir and not os.path.isabs(self.run_dir):
            return Location(root) / self.run_dir.strip("/")
        return Location(self.run_dir)

    def layout(self) -> "RunLayout":  # noqa: F821
        """Every path of this run (see rayrobust.layout)."""
        from .layout import RunLayout

        return RunLayout(self.run_location())

    def for_method(self, method: str) -> "ExperimentConfig":
        """This config for one method: train.method set and `method_overrides[method]` applied."""
        raw = self.to_dict()
        raw["train"]["method"] = method
        for name, values in self.method_overrides.get(method, {}).items():
            if name == "train":  # method_args merge per method and setting
                values = migrate_train_dict(dict(values))
                for m, settings in (values.pop("method_args", None) or {}).items():
                    raw["train"]["method_args"].setdefault(m, {}).update(settings or {})
            raw[name].update(values)
        return config_from_dict(raw)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig,
            "semantic": SemanticConfig, "tune": TuneConfig}


def _valid_keys(cls) -> List[str]:
    return [f.name for f in fields(cls)]


def _unknown_key(key: str, valid: List[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys in {where}: {', '.join(valid)}")


def coerce_field(cls, key: str, value: Any, where: Optional[str] = None) -> Any:
    """Coerce a YAML/CLI value to the dataclass field's declared type, with a clear error."""
    hint = get_type_hints(cls)[key]
    text = str(hint)
    where = where or cls.__name__.replace('Config', '').lower()
    if value is None:
        if "Optional" in text or "None" in text:
            return None
        raise ConfigError(f"{where}.{key} cannot be null")
    try:
        if hint is bool or text.endswith("Optional[bool]") or "bool" in text and "int" not in text:
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "yes", "1", "on"):
                    return True
                if low in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int or "Optional[int]" in text:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if "List[int]" in text:
            if isinstance(value, str):
                return [int(v) for v in value.split(",") if v.strip()]
            if isinstance(value, int):
                return [value]
            return [int(v) for v in value]
        if "List[str]" in text:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        return value if not isinstance(value, (int, float)) or hint is not str else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {where + '.' + key!r}: cannot read {value!r} as {text}") from None


def _build(cls, raw: Dict[str, Any], where: str):
    valid = _valid_keys(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in valid:
            raise _unknown_key(f"{where}.{key}" if where else key, valid, where or "the top level")
        kwargs[key] = coerce_field(cls, key, value)
    return cls(**kwargs)


def config_from_dict(raw: Dict[str, Any]) -> ExperimentConfig:
    raw = dict(raw or {})
    sections = {}
    for name, cls in SECTIONS.items():
        sub = raw.pop(name, None) or {}
        if not isinstance(sub, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {sub!r}")
        if cls is TrainConfig:
            sub = migrate_train_dict(sub)
        sections[name] = _build(cls, sub, name)
    top_valid = [f.name for f in fields(ExperimentConfig) if f.name not in SECTIONS]
    top = {}
    for key, value in raw.items():
        if key not in top_valid:
            raise _unknown_key(key, top_valid + list(SECTIONS), "the top level")
        top[key] = coerce_field(ExperimentConfig, key, value)
    return ExperimentConfig(**top, **sections)


def _set_dotted(raw: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1:
        top_valid = [f.name for f in fields(ExperimentConfig) if f.name not in SECTIONS]
        if key not in top_valid:
            # A bare field name that exists in exactly one section (e.g. `method`, `epochs`).
            owners = [s for s, cls in SECTIONS.items() if key in _valid_keys(cls)]
            if len(owners) == 1:
                parts = [owners[0], key]
            elif len(owners) > 1:
                raise ConfigError(f"config key {key!r} is ambiguous; write one of: {', '.join(f'{o}.{key}' for o in owners)}")
        if key in LEGACY_TRAIN_KEYS:  # a per-method setting under its earlier flat name
            parts = ["train", key]
    deep = len(parts) in (3, 4) and parts[:2] == ["train", "method_args"]  # train.method_args.<method>[.<setting>]
    if not deep and (len(parts) > 2 or (len(parts) == 2 and parts[0] not in SECTIONS)):
        raise ConfigError(f"unknown config key {key!r}; sections are: {', '.join(SECTIONS)}")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def parse_override(text: str) -> tuple:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.epochs=2)")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None) -> ExperimentConfig:
    raw: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; see configs/ for examples")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)

