"""Typed, frozen run configuration, loaded from YAML with dotted command-line overrides.

Unknown keys and values of the wrong type are errors that name the dotted key. Method
hyper-parameters live in each method's own ``Options`` dataclass, resolved by method name.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    data_dir: str | None = None  # default: $CTBENCH_DATA, else ./data (MNIST falls back to the bundled copy)
    download: bool = True
    validation_size: int = 5000  # carved from the training set for model selection; 0: none, last epoch
    train_subset: int | None = None  # use only the first N training images (tests, quick runs)
    padding_mode: str = "zeros"  # crop padding: "zeros" (paper) or "replicate" (reference code)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = "cnn7"
    batch_norm: bool = True
    init: str = "auto"  # "auto": IBP init for certified methods, Kaiming uniform otherwise


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 70
    batch_size: int = 256
    lr: float = 5e-4
    lr_milestones: tuple[int, ...] = (50, 60)
    lr_decay: float = 0.2
    grad_clip: float = 10.0
    accumulation_steps: int = 1  # sub-batches per step; BatchNorm statistics come from the full batch


@dataclass(frozen=True)
class EpsConfig:
    """eps rises per iteration from 0 at ramp_start_epoch to train_eps at ramp_end_epoch:
    a power (exponent 4) for the first quarter of the ramp, then linear with the same slope
    (Shi et al. 2021). Epochs before standard_epochs train without perturbation."""

    train_eps: float = 0.1
    test_eps: float = 0.1
    standard_epochs: int = 0
    ramp_start_epoch: int = 0
    ramp_end_epoch: int = 20
    ramp_exponent: float = 4.0
    ramp_power_fraction: float = 0.25


@dataclass(frozen=True)
class RegularizationConfig:
    l1: float = 0.0  # on conv/linear weights only
    shi_weight: float = 0.0  # Shi et al. warm-up regularizer, scaled by (1 - eps / train_eps) during the ramp
    shi_tolerance: float = 0.5


@dataclass(frozen=True)
class AttackConfig:
    """The attack used inside training (PGD, SABR, MTL-IBP, TAPS, EDAC)."""

    steps: int = 10
    restarts: int = 3
    step_size: float = 0.25  # fraction of the box width
    step_decay: float = 0.5
    decay_at: tuple[float, ...] = (0.5, 0.75)
    random_start: bool = True
    eps_factor: float = 1.0  # attack box radius = eps_factor x eps (MTL-IBP on CIFAR-10 2/255: 2)
    precision: str = "float32"  # float32, or bfloat16 / float16 autocast for the attack passes only


@dataclass(frozen=True)
class EvaluationConfig:
    batch_size: int = 1000
    attack_steps: int = 20
    attack_restarts: int = 3
    selection: str = "auto"  # validation metric for the best epoch: auto, certified, adversarial, natural, last
    population_batches: int | None = None  # batches for population BN statistics (None: all)
    final_test_count: int | None = None  # test samples for the final numbers (None: all)


@dataclass(frozen=True)
class SWAConfig:
    start_epoch: int | None = None  # average weights from this epoch on (None: off)


@dataclass(frozen=True)
class MethodConfig:
    name: str = "ibp"
    w_rob: float = 1.0
    options: Any = None  # the method's own Options dataclass, resolved by name


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    threads: int | None = None  # torch CPU threads (None: torch's default)
    memory_format: str = "channels_last"  # layout of conv activations in training: channels_last or contiguous
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eps: EpsConfig = field(default_factory=EpsConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type; errors name the dotted key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, key)
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(_fraction(value))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _fraction(text: str) -> float:
    """Numbers may be written as fractions, e.g. 8/255."""
    if "/" in text:
        numerator, denominator = text.split("/", 1)
        return float(numerator) / float(denominator)
    return float(text)


def build_dataclass(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]}; valid keys{' of ' + prefix if prefix else ''}: "
                          + ", ".join(sorted(names)))
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if cls is MethodConfig and name == "options":
            values[name] = value
            continue
        values[name] = _convert(value, hints[name], key)
    return cls(**values)


def _method_config(data: Mapping[str, Any]) -> MethodConfig:
    """The method section: name and w_rob, every other key belongs to that method's Options."""
    from .methods import METHODS

    data = dict(data)
    name = data.pop("name", MethodConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected a string, got {name!r}")
    try:
        method_cls = METHODS.get(name)
    except KeyError as error:
        raise ConfigError(f"method.name: {error.args[0]}") from None
    w_rob = _convert(data.pop("w_rob", MethodConfig.w_rob), float, "method.w_rob")
    if not 0.0 <= w_rob <= 1.0:
        raise ConfigError(f"method.w_rob: must lie in [0, 1], got {w_rob}")
    options = build_dataclass(method_cls.Options, data, "method")
    return MethodConfig(name=name, w_rob=w_rob, options=options)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    data = dict(data)
    method = _method_config(data.pop("method", {}) or {})
    config = build_dataclass(TrainConfig, data)
    config = dataclasses.replace(config, method=method)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    eps = config.eps
    if eps.train_eps < 0 or eps.test_eps < 0:
        raise ConfigError("eps.train_eps and eps.test_eps must be >= 0")
    if not eps.standard_epochs <= eps.ramp_start_epoch <= eps.ramp_end_epoch:
        raise ConfigError("eps: need standard_epochs <= ramp_start_epoch <= ramp_end_epoch")
    if config.optim.batch_size % config.optim.accumulation_steps:
        raise ConfigError(f"optim.accumulation_steps={config.optim.accumulation_steps} must divide "
                          f"optim.batch_size={config.optim.batch_size}")
    if config.evaluation.selection not in ("auto", "certified", "adversarial", "natural", "last"):
        raise ConfigError(f"evaluation.selection: unknown {config.evaluation.selection!r}; "
                          "use auto, certified, adversarial, natural or last")
    if config.data.validation_size == 0 and config.evaluation.selection not in ("auto", "last"):
        raise ConfigError(f"evaluation.selection={config.evaluation.selection} needs a validation split, but "
                          "data.validation_size is 0; set a size, or selection auto/last (the last epoch)")
    if config.memory_format not in ("channels_last", "contiguous"):
        raise ConfigError(f"memory_format: use channels_last or contiguous, got {config.memory_format!r}")
    if config.attack.precision not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"attack.precision: use float32, bfloat16 or float16, got {config.attack.precision!r}")
    if config.data.padding_mode not in ("zeros", "replicate"):
        raise ConfigError(f"data.padding_mode: use zeros or replicate, got {config.data.padding_mode!r}")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    method = data.pop("method")
    options = method.pop("options") or {}
    data["method"] = {**method, **options}
    return _plain(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return data


def dump_yaml(config: TrainConfig, path: Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
