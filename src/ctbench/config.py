"""Typed, frozen run configuration, loaded from YAML with dotted command-line overrides.

Unknown keys or names, values of the wrong type and values out of range (``RANGES``) are
errors that name the dotted key and the fix, with the closest valid name where one is near.
Method hyper-parameters live in each method's own ``Options`` dataclass, resolved by method name.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and the fix."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """The hint "; did you mean 'x'?" for the choice closest to a misspelt word, else an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


FILES_DATASET = "files"  # data.dataset of your own files (data.path; ctbench.data.files)
FILE_FORMATS = ("idx", "image-folder", "npz", "pt")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    data_dir: str | None = None  # default: $CTBENCH_DATA, else ./data (MNIST falls back to the bundled copy)
    download: bool = True
    validation_size: int = 5000  # carved from the training set for model selection; 0: none, last epoch
    train_subset: int | None = None  # use only the first N training images (tests, quick runs)
    padding_mode: str = "zeros"  # crop padding: "zeros" (paper) or "replicate" (reference code)
    # the network's first layer normalizes by the dataset's mean/std (the reference; MNIST 0.1307/0.3081);
    # false: identity (the paper's text gives MNIST no preprocessing)
    normalize: bool = True
    # Your own files, with data.dataset: files (README, "Your own models and data"):
    path: str | None = None  # a .npz or .pt file, or a folder of IDX files or of images; relative to the current folder
    format: str | None = None  # idx, image-folder, npz or pt; null: from the path
    shape: tuple[int, ...] | None = None  # (C, H, W) of the images, H == W
    classes: int | None = None  # the labels are 0 to classes - 1
    mean: tuple[float, ...] | None = None  # per channel, of the images scaled to [0, 1]; null: no normalization
    std: tuple[float, ...] | None = None
    # (low, high) of the stored values, scaled to [0, 1] (the range of eps); null: (0, 255) for uint8, else (0, 1)
    value_range: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = "cnn7"
    batch_norm: bool = True
    # "auto": IBP init for certified methods, Kaiming uniform otherwise; "keep": the weights the model
    # has (a model passed to ctbench.train; a built one keeps torch's default init)
    init: str = "auto"


@dataclass(frozen=True)
class OptimConfig:
    """Adam with a step-wise learning rate. Divergence stops a run: a non-finite loss, or a step
    loss above divergence_factor x max(1, median loss of the last 100 steps); the floor of 1 keeps
    a run whose loss is near 0 from stopping on one harder batch. The last good checkpoint is kept."""

    epochs: int = 70
    batch_size: int = 256
    lr: float = 5e-4
    lr_milestones: tuple[int, ...] = (50, 60)
    lr_decay: float = 0.2
    grad_clip: float | None = 10.0  # max gradient norm; None: no clipping
    accumulation_steps: int = 1  # sub-batches per step; BatchNorm statistics come from the full batch
    divergence_factor: float | None = 1e4  # None: stop only on a non-finite loss


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
    # input radius of the tightness term: "normalized" (after the normalization layer, eps/std: Shi et al.'s
    # code and the reference) or "pixel" (eps itself)
    shi_input_space: str = "normalized"


@dataclass(frozen=True)
class AttackConfig:
    """The attack used inside training (PGD, SABR, MTL-IBP, TAPS, EDAC). The defaults are the
    reference's; ctbench's former attack is step_size 0.25, step_relative_to width,
    step_schedule decay, random_start uniform (on mnist-mini 0.1, 3 paired seeds: MTL-IBP -0.57 ±
    0.05 certified, SABR -0.05 ± 0.06; results/mnist-mini/arms-ab.md)."""

    steps: int = 10
    restarts: int = 3
    # sign step as a fraction of step_relative_to; None: the method's reference fraction of the half-width
    # (SABR, STAPS: 0.2; PGD, MTL-IBP, EDAC: max(0.25, 2/steps); TAPS latent: max(0.4, 4/steps))
    step_size: float | None = None
    step_relative_to: str = "half_width"  # per coordinate: "half_width" (reference) or "width"
    step_schedule: str = "constant"  # "constant" (reference, <= 10 steps) or "decay" (step_decay at decay_at)
    step_decay: float = 0.5
    decay_at: tuple[float, ...] = (0.5, 0.75)
    # "clamped_noise": clean input + uniform noise of the half-width, clamped to the box (reference);
    # "uniform": uniform in the box; "center": the box centre
    random_start: str = "clamped_noise"
    eps_factor: float = 1.0  # attack box radius = eps_factor x eps (MTL-IBP on CIFAR-10 2/255: 2)
    # float32, or bfloat16 / float16 autocast for the attack passes only, or auto: bfloat16 where
    # the device has fast bf16 matmuls (AVX512-BF16/AMX CPUs, CUDA with bf16), float32 elsewhere.
    # auto by default: on mnist-mini, 3 seeds per arm, bfloat16 attacks moved no method's certified
    # accuracy beyond its seed spread (results/mnist-mini.md), and they halve SABR's step there.
    precision: str = "auto"


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
    # snapshot every N optimizer steps (reference); None: once per epoch, at its end (MTL-IBP on
    # mnist-mini 0.1: -0.03 ± 0.04 certified over 3 paired seeds)
    every_steps: int | None = 10


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
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _number(value: Any) -> float | None:
    """A YAML number or numeric string (e.g. "8/255") as a float; None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return _fraction(value) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _fraction(text: str) -> float:
    """Numbers may be written as fractions, e.g. 8/255."""
    if "/" in text:
        numerator, denominator = text.split("/", 1)
        return float(numerator) / float(denominator)
    return float(text)


def build_dataclass(cls: type, data: Mapping[str, Any], prefix: str = "", caller_keys: Iterable[str] = ()) -> Any:
    """``cls`` from a mapping; ``caller_keys`` are further valid keys of the section that the
    caller has taken out (they are named when a key is unknown)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        _unknown_key(unknown[0], names | set(caller_keys), prefix)
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if cls is MethodConfig and name == "options":
            values[name] = value
            continue
        values[name] = _convert(value, hints[name], key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as error:  # an Options class checking its own values names the key
        raise ConfigError(str(error)) from None


def _unknown_key(name: str, valid: set[str], prefix: str) -> None:
    where = f"{prefix}." if prefix else ""
    raise ConfigError(f"unknown config key {where}{name}; valid keys{' of ' + prefix if prefix else ''}: "
                      + ", ".join(sorted(valid)) + did_you_mean(name, valid))


def _method_config(data: Mapping[str, Any]) -> MethodConfig:
    """The method section: name and w_rob, every other key belongs to that method's Options."""
    from .methods import METHODS

    data = dict(data)
    name = data.pop("name", MethodConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected a string, got {name!r}")
    method_cls = METHODS.get(name)
    w_rob = _convert(data.pop("w_rob", MethodConfig.w_rob), float, "method.w_rob")
    if not 0.0 <= w_rob <= 1.0:
        raise ConfigError(f"method.w_rob: must lie in [0, 1], got {w_rob}")
    options = build_dataclass(method_cls.Options, data, "method", caller_keys=("name", "w_rob"))
    return MethodConfig(name=name, w_rob=w_rob, options=options)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    data = dict(data)
    method = _method_config(data.pop("method", {}) or {})
    config = build_dataclass(TrainConfig, data)
    config = dataclasses.replace(config, method=method)
    validate(config)
    return config


# What a config saved before a key existed meant: the behaviour of ctbench at the time. A saved
# config (checkpoint, run folder) is read with these defaults, so its run resumes and evaluates
# as it was trained; presets and new configs get the dataclass defaults.
LEGACY_DEFAULTS = {
    ("attack", "step_relative_to"): "width",
    ("attack", "step_schedule"): "decay",
    ("regularization", "shi_input_space"): "pixel",
    ("swa", "every_steps"): None,
}


def saved_config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """``config_from_dict`` for a config saved by any ctbench version (``LEGACY_DEFAULTS``; the
    old boolean ``attack.random_start``; MNIST was not normalized before ``data.normalize``)."""
    data = {key: dict(value) if isinstance(value, Mapping) else value for key, value in data.items()}
    for (section, key), value in LEGACY_DEFAULTS.items():
        data.setdefault(section, {}).setdefault(key, value)
    attack = data["attack"]
    if isinstance(attack.get("random_start"), bool):
        attack["random_start"] = "uniform" if attack["random_start"] else "center"
    if data.get("data", {}).get("dataset", "mnist") == "mnist":
        data.setdefault("data", {}).setdefault("normalize", False)
    method = data.get("method", {})
    if method.get("name") in ("sabr", "staps"):
        method.setdefault("regularizer_box", "full")
    return config_from_dict(data)


def validate(config: TrainConfig) -> None:
    _validate_ranges(config)
    _validate_schedule(config)
    _validate_files(config.data)
    _validate_names(config)
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
    if config.attack.precision not in ("float32", "bfloat16", "float16", "auto"):
        raise ConfigError(f"attack.precision: use float32, bfloat16, float16 or auto, got {config.attack.precision!r}")
    if config.data.padding_mode not in ("zeros", "replicate"):
        raise ConfigError(f"data.padding_mode: use zeros or replicate, got {config.data.padding_mode!r}")
    _validate_choices(config)
    if config.attack.step_size is not None and config.attack.step_size <= 0:
        raise ConfigError(f"attack.step_size: must be > 0 (or null: the method's own), got {config.attack.step_size}")
    if config.swa.every_steps is not None and config.swa.every_steps < 1:
        raise ConfigError(f"swa.every_steps: must be >= 1 (or null: once per epoch), got {config.swa.every_steps}")


# (section, key) -> its allowed string values
CHOICES = {
    ("regularization", "shi_input_space"): ("normalized", "pixel"),
    ("attack", "step_relative_to"): ("half_width", "width"),
    ("attack", "step_schedule"): ("constant", "decay"),
    ("attack", "random_start"): ("clamped_noise", "uniform", "center"),
    ("data", "format"): FILE_FORMATS,
}


def _validate_choices(config: TrainConfig) -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value is not None and value not in allowed:  # None: unset (data.format: from the path)
            raise ConfigError(f"{section}.{key}: use {' or '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key; an open end is excluded."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


NON_NEGATIVE, POSITIVE, AT_LEAST_ONE = Range(0), Range(0, low_open=True), Range(1)
UNIT, SHRINK = Range(0, 1), Range(0, 1, low_open=True)
EPS_NOTE = "; images lie in [0, 1] (8/255 may be written as a fraction)"

# dotted key -> (allowed values, note on the fix); None values (where allowed) are not checked
RANGES: dict[str, tuple[Range, str]] = {
    "seed": (NON_NEGATIVE, ""),
    "threads": (AT_LEAST_ONE, "; null: torch's default"),
    "data.validation_size": (NON_NEGATIVE, "; 0: no validation split"),
    "data.train_subset": (AT_LEAST_ONE, "; null: the whole training set"),
    "data.shape": (AT_LEAST_ONE, "; the images' (C, H, W), e.g. [1, 28, 28]"),
    "data.classes": (Range(2), "; the labels are 0 to classes - 1"),
    "data.std": (POSITIVE, "; the per-channel standard deviation of the images scaled to [0, 1]"),
    "optim.epochs": (AT_LEAST_ONE, ""),
    "optim.batch_size": (AT_LEAST_ONE, ""),
    "optim.lr": (Range(0, 10, low_open=True), "; Adam usually trains with 1e-4 to 1e-2"),
    "optim.lr_milestones": (NON_NEGATIVE, "; milestones are epochs, counted from 0"),
    "optim.lr_decay": (SHRINK, ""),
    "optim.grad_clip": (POSITIVE, "; null: no clipping"),
    "optim.accumulation_steps": (AT_LEAST_ONE, ""),
    "optim.divergence_factor": (Range(1, low_open=True), "; null: stop only on a non-finite loss"),
    "eps.train_eps": (UNIT, EPS_NOTE),
    "eps.test_eps": (UNIT, EPS_NOTE),
    "eps.standard_epochs": (NON_NEGATIVE, ""),
    "eps.ramp_start_epoch": (NON_NEGATIVE, ""),
    "eps.ramp_end_epoch": (NON_NEGATIVE, ""),
    "eps.ramp_exponent": (POSITIVE, ""),
    "eps.ramp_power_fraction": (SHRINK, ""),
    "regularization.l1": (NON_NEGATIVE, "; 0: off"),
    "regularization.shi_weight": (NON_NEGATIVE, "; 0: off"),
    "regularization.shi_tolerance": (POSITIVE, ""),
    "attack.steps": (NON_NEGATIVE, ""),
    "attack.restarts": (AT_LEAST_ONE, ""),
    "attack.step_decay": (SHRINK, ""),
    "attack.decay_at": (UNIT, "; these are fractions of attack.steps"),
    "attack.eps_factor": (POSITIVE, ""),
    "evaluation.batch_size": (AT_LEAST_ONE, ""),
    "evaluation.attack_steps": (NON_NEGATIVE, ""),
    "evaluation.attack_restarts": (AT_LEAST_ONE, ""),
    "evaluation.population_batches": (AT_LEAST_ONE, "; null: all"),
    "evaluation.final_test_count": (AT_LEAST_ONE, "; null: the whole test set"),
    "swa.start_epoch": (NON_NEGATIVE, "; null: no SWA"),
}


def _validate_ranges(config: TrainConfig) -> None:
    for key, (allowed, note) in RANGES.items():
        value = functools.reduce(getattr, key.split("."), config)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for index, item in items:
            if item is not None and item not in allowed:
                where = key if index is None else f"{key}[{index}]"
                raise ConfigError(f"{where}: must be {allowed}, got {item}{note}")


def _validate_schedule(config: TrainConfig) -> None:
    """The epoch settings against each other: eps ramp order, ramp and SWA within the run."""
    eps, epochs = config.eps, config.optim.epochs
    if not eps.standard_epochs <= eps.ramp_start_epoch <= eps.ramp_end_epoch:
        raise ConfigError(f"eps: need standard_epochs <= ramp_start_epoch <= ramp_end_epoch, got "
                          f"{eps.standard_epochs}, {eps.ramp_start_epoch}, {eps.ramp_end_epoch}")
    if eps.ramp_end_epoch > epochs:
        raise ConfigError(f"eps.ramp_end_epoch={eps.ramp_end_epoch} is after the last epoch (optim.epochs={epochs}): "
                          "no epoch would train at the full eps.train_eps; lower eps.ramp_end_epoch or raise "
                          "optim.epochs")
    if config.swa.start_epoch is not None and config.swa.start_epoch >= epochs:
        raise ConfigError(f"swa.start_epoch={config.swa.start_epoch} is not an epoch of the run (0 to {epochs - 1}); "
                          "lower it, or set it to null for no SWA")


FILES_KEYS = ("path", "format", "shape", "classes", "mean", "std", "value_range")


def _validate_files(data: DataConfig) -> None:
    """The keys that describe your own files: required with data.dataset: files, refused with other datasets
    (the files themselves are checked as they are read, ctbench.data.files)."""
    given = [key for key in FILES_KEYS if getattr(data, key) is not None]
    if data.dataset != FILES_DATASET:
        if given:
            raise ConfigError(f"data.{given[0]} describes your own files, read only with data.dataset: "
                              f"{FILES_DATASET}; drop it, or set data.dataset: {FILES_DATASET} (now {data.dataset!r})")
        return
    for key, example in (("path", "data/my_images.npz"), ("shape", "[1, 28, 28]"), ("classes", "10")):
        if getattr(data, key) is None:
            raise ConfigError(f"data.{key} is required with data.dataset: {FILES_DATASET}, e.g. data.{key}: {example}")
    if len(data.shape) != 3:
        raise ConfigError(f"data.shape: give the images' [C, H, W], e.g. [1, 28, 28]; got {list(data.shape)}")
    channels, height, width = data.shape
    if height != width:
        raise ConfigError(f"data.shape: the models take square images (H == W), got {height}x{width}; "
                          "crop or pad the images to a square")
    if (data.mean is None) != (data.std is None):
        raise ConfigError("data.mean and data.std go together: give both (per channel), or neither (no normalization)")
    for key in ("mean", "std"):
        values = getattr(data, key)
        if values is not None and len(values) != channels:
            raise ConfigError(f"data.{key}: give one value per channel ({channels}, data.shape[0]), got {list(values)}")
    if data.value_range is not None:
        if len(data.value_range) != 2 or not data.value_range[0] < data.value_range[1]:
            raise ConfigError(f"data.value_range: give [low, high] with low < high, the range of the stored values "
                              f"(e.g. [0, 255] or [0, 1]); got {list(data.value_range)}")


def _validate_names(config: TrainConfig) -> None:
    """Dataset, architecture and initialization must be registered (the method is checked on reading)."""
    from .data import DATASETS
    from .models import INITS, MODELS

    if config.data.dataset != FILES_DATASET:
        DATASETS.get(config.data.dataset)
    MODELS.get(config.model.architecture)
    init = config.model.init
    if init not in ("auto", "keep") and init not in INITS:
        names = ["auto", "keep", *INITS.names()]
        raise ConfigError(f"unknown initialization {init!r} (model.init); known: {', '.join(names)}"
                          + did_you_mean(init, names))


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    method = data.pop("method")
    options = method.pop("options") or {}
    data["method"] = {**method, **options}
    if data["data"]["dataset"] != FILES_DATASET:
        # unset for every other dataset; left out so that configs (and the bench's job keys) stay as before
        for key in FILES_KEYS:
            del data["data"][key]
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
    """Apply command-line overrides 'key.sub=value' (values parsed as YAML) to config data."""
    for text in overrides:
        path, value = parse_override(text)
        _set_dotted(data, path, value, f"override {text!r}")
    return data


def apply_override_values(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply overrides given as {"optim.epochs": 1, ...} (Python values) to config data."""
    for key, value in overrides.items():
        path = [part for part in str(key).split(".") if part]
        if not path:
            raise ConfigError(f"override key {key!r} is empty; use dotted names such as 'optim.epochs'")
        _set_dotted(data, path, value, f"override {key!r}")
    return data


def _set_dotted(data: dict[str, Any], path: list[str], value: Any, where: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part} is not a section")
        node = child
    node[path[-1]] = value


# Keys a resumed run may change (``--resume --allow-change``): they do not alter the epochs
# already trained. optim.epochs may only grow (extending a run; the lr milestones and the eps ramp
# are epoch numbers, so earlier epochs keep their schedule); the others are evaluation and runtime settings.
SAFE_CHANGES = ("optim.epochs", "device", "threads", "data.data_dir", "data.download", "evaluation.batch_size",
                "evaluation.attack_steps", "evaluation.attack_restarts", "evaluation.population_batches",
                "evaluation.final_test_count")


def flat_config(config: TrainConfig) -> dict[str, Any]:
    """The config as {dotted key: value}."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(config_to_dict(config), "")
    return flat


def config_changes(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every key whose value differs."""
    before, after = flat_config(old), flat_config(new)
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)}


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
