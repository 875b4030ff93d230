"""The public Python API, also reachable from the package: ``ctbench.train``,
``ctbench.evaluate``, ``ctbench.certify`` and ``ctbench.bounds.ibp`` / ``ctbench.bounds.crown``.

Networks are ``nn.Sequential`` of the layers ctbench lowers (``models.ops.LOWERINGS``), or any
module that torch.fx traces into them (residual additions, concatenations, pooling), whose output
is an ``nn.Linear`` (the logits); data are (images, labels) tensors: images (N, C, H, W) as floats in [0, 1]
or as uint8 (divided by 255), labels (N,) integers. Every function checks its inputs and
raises an error that names the cause and the fix (``ConfigError`` for configs and data,
``CertifyInputError`` for eps and images out of range). Nothing is printed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .config import ConfigError, TrainConfig, apply_override_values, config_from_dict, config_to_dict
from .config import saved_config_from_dict

Data = tuple[Tensor, Tensor]
ConfigSource = str | Path | TrainConfig | Mapping[str, Any]
ProgressFactory = Callable[[Iterable, int, str], Iterable]


def train(config: ConfigSource, model: nn.Module | None = None, data: Data | None = None,
          out: str | Path | None = None, *, overrides: Mapping[str, Any] | None = None,
          test_data: Data | None = None, resume: bool = False, allow_change: bool = False,
          init_from: str | Path | None = None, on_epoch: Callable[[dict], None] | None = None,
          progress: ProgressFactory | None = None) -> dict:
    """Train as ``ctbench train`` does and return results.json's content (the test result is
    None when ``data`` is given without ``test_data``).

    config: a preset ("mnist-mini-0.1/ibp"), a YAML file, a run folder, a ``TrainConfig`` or a
    mapping of config data; ``overrides``: {"optim.epochs": 1, ...}, checked like ``--set``.
    model: your network, trained in place (it ends with the weights the run hands on), after
    model.init initializes it ("keep" trains it from the weights it has); default: the config's
    architecture. data: your (images, labels) training set (the validation split,
    data.validation_size, is carved from it; no augmentation; the built model normalizes by its
    per-channel mean and std), default the config's dataset. out: the run folder (default
    runs/<preset>; required for a config object). resume, allow_change, init_from: as
    --resume, --allow-change, --init-from. on_epoch(record): called after every epoch with its
    metrics.jsonl record (``training.runlog.describe_epoch`` formats it); progress: wraps the
    batches of each epoch, validation and test (e.g. a tqdm bar)."""
    from .training import Trainer

    resolved = resolve_config(config, overrides)
    dataset = None if data is None else user_dataset(data, test_data, model)
    if model is not None:
        check_model(model, dataset.spec if dataset is not None else _registered_spec(resolved))
    trainer = Trainer(resolved, run_folder(config, out), progress=progress, dataset=dataset,
                      final_test=data is None or test_data is not None, model=model, init_from=init_from,
                      on_epoch=on_epoch, allow_change=allow_change)
    return trainer.fit(resume=resume)


def evaluate(model: nn.Module, inputs: Tensor, labels: Tensor, eps: float, attack: str | None = "pgd", *,
             steps: int | None = None, restarts: int | None = None, crown_ibp: bool = False,
             batch_size: int = 1000) -> dict:
    """Natural, IBP-certified (with ``crown_ibp`` also IBP-or-CROWN-IBP-certified) and
    adversarial accuracy of ``model`` on (inputs, labels) at radius ``eps``, as a dict that names
    the attack. attack: "pgd" (``steps`` 20 x ``restarts`` 3, restarts alternating the
    cross-entropy and margin losses), "apgd" (APGD-CE then APGD-T, 100 iterations x 1 restart
    per run) or None. Computed on the device of the model's parameters."""
    from .certify.cascade import check_eps, check_inputs
    from .data import Split
    from .evaluation import evaluate as evaluate_split

    eps = check_eps(eps)
    check_inputs(inputs, labels, (0.0, 1.0))
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    result = evaluate_split(model, Split(inputs, labels), eps, device, batch_size,
                            attack=evaluation_attack(attack, steps, restarts), crown_ibp=crown_ibp)
    return result.as_dict()


def certify(model: nn.Module, inputs: Tensor, labels: Tensor, eps: float, stages: str | list[str] | None = None,
            timeout: float | None = None, **options):
    """Per-sample verdicts of the certification cascade (``ctbench.certify.certify``) for
    (inputs, labels) at radius eps: a ``CertifyResult`` (verdicts, summary). stages: e.g.
    "ibp,crown-ibp,attack,alpha-crown,bab" (the default); timeout: seconds per sample;
    ``options``: indices, out_dir (where verdicts.jsonl goes; default: nowhere), settings,
    device, progress, ... of the cascade."""
    from .certify.cascade import certify as certify_cascade

    return certify_cascade(model, (inputs, labels), eps, stages=stages, timeout=timeout, **options)


# ----------------------------------------------------------------------------------------------
# the pieces, also used by the command line


def resolve_config(source: ConfigSource, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config of a preset, YAML file, run folder, TrainConfig or mapping, with ``overrides``
    ({dotted key: value}) applied and every key and value checked."""
    from .presets import source_data

    if isinstance(source, TrainConfig):
        data, read = config_to_dict(source), config_from_dict
    elif isinstance(source, Mapping):
        data, read = dict(source), config_from_dict
    else:
        data = source_data(source)
        read = saved_config_from_dict if Path(source).is_dir() else config_from_dict
    return read(apply_override_values(data, overrides or {}))


def run_folder(source: ConfigSource, out: str | Path | None) -> Path:
    """``out``, else the command line's default for a named config."""
    from .presets import default_run_folder

    if out is not None:
        return Path(out)
    if isinstance(source, (TrainConfig, Mapping)):
        raise ConfigError("give out=FOLDER: a config object has no name to derive the run folder from")
    return default_run_folder(source)


def user_dataset(train: Data, test: Data | None, model: nn.Module | None):
    """A ``Dataset`` named "user" from (images, labels) tensors: its input spec (channels, size,
    classes: the largest label + 1 or the model's outputs, per-channel mean and std of the
    training images) and no augmentation."""
    from .data import Augmentation, Dataset, Split
    from .models import InputSpec

    splits = [Split(*_checked_pair(train, "data"))]
    if test is not None:
        splits.append(Split(*_checked_pair(test, "test_data")))
    images = splits[0].images
    if images.dim() != 4 or (test is not None and splits[1].images.shape[1:] != images.shape[1:]):
        raise ConfigError(f"images must be (N, C, H, W), the same C, H, W for data and test_data; got "
                          f"{[tuple(split.images.shape) for split in splits]}")
    if model is None and images.shape[2] != images.shape[3]:
        raise ConfigError(f"the built architectures take square images, got {images.shape[2]}x{images.shape[3]}; "
                          "pass your own model= for other shapes")
    pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3)).clamp(min=1e-3)
    classes = max(int(split.labels.max()) + 1 for split in splits)
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:] if model is not None else []
    if last_linear:
        classes = max(classes, last_linear[0].out_features)  # a class may be missing from the labels
    spec = InputSpec(images.shape[1], images.shape[2], classes, tuple(mean.tolist()), tuple(std.tolist()))
    test_split = splits[1] if test is not None else Split(images[:0], splits[0].labels[:0])
    return Dataset("user", spec, splits[0], test_split, Augmentation())


def _checked_pair(pair: Data, name: str) -> Data:
    from .certify.cascade import check_inputs
    from .certify.stages import CertifyInputError

    try:
        images, labels = pair
        check_inputs(images, labels, (0.0, 1.0))
    except (TypeError, ValueError, CertifyInputError) as error:
        raise ConfigError(f"{name} (an (images, labels) pair of tensors): {error}") from None
    if len(labels) == 0 or int(labels.min()) < 0:
        raise ConfigError(f"{name}: labels must be class indices 0, 1, ..., and there must be at least one sample")
    return images, labels.long()


def check_model(model: nn.Module, spec) -> None:
    """A network ctbench can train on inputs of ``spec``: an ``nn.Sequential`` or any module
    torch.fx traces into ops ctbench lowers (residual additions, concatenations, pooling, ...),
    whose output is a Linear layer with one output per class (the logits)."""
    from .models.ops import LinearOp, lower_network, network_ops, run_ops

    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch nn.Module, got {type(model).__name__}")
    try:
        network = lower_network(model, detach=True)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model: {error}") from None
    ops = network_ops(network)
    if not ops or not isinstance(ops[-1], LinearOp):
        last = type(ops[-1]).__name__.removesuffix("Op") if ops else "nothing"
        raise ConfigError(f"model must end in an nn.Linear layer, whose outputs are the logits; its output comes "
                          f"from {last}")
    parameter = next(model.parameters())
    probe = torch.zeros(1, spec.channels, spec.size, spec.size, dtype=parameter.dtype, device=parameter.device)
    try:
        with torch.no_grad():
            outputs = run_ops(network, probe).shape[1]
    except RuntimeError as error:
        raise ConfigError(f"model does not take images of shape {tuple(probe.shape[1:])}: {error}") from None
    if outputs != spec.classes:
        raise ConfigError(f"model gives {outputs} outputs but the data has {spec.classes} classes (labels 0 to "
                          f"{spec.classes - 1}): give the last Linear layer {spec.classes} outputs")


def _registered_spec(config: TrainConfig):
    from .data import input_spec

    return input_spec(config.data)


def evaluation_attack(name: str | None, steps: int | None = None, restarts: int | None = None):
    """The attack settings for "pgd", "apgd" or None."""
    from .attacks import PGDSettings
    from .evaluation import APGDAttack

    if name is None:
        return None
    if name == "pgd":
        return PGDSettings(steps=steps or 20, restarts=restarts or 3)
    if name == "apgd":
        return APGDAttack(iterations=steps or APGDAttack.iterations, restarts=restarts or APGDAttack.restarts)
    raise ValueError(f"unknown attack {name!r}; use 'pgd', 'apgd' or None")
