"""CNN3, CNN5 and CNN7 of the certified-training literature, as plain nn.Sequential.

Layer sizes follow the reference implementation (REFERENCE.md, "Data and models"): CNN7-BN has
13.26 M parameters on MNIST, 17.19 M on CIFAR-10 and 17.29 M in its TinyImageNet variant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..registry import Registry
from .layers import Normalize


@dataclass(frozen=True)
class InputSpec:
    """What a model needs to know about its data: shape, classes and normalization."""

    channels: int
    size: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


ModelBuilder = Callable[[InputSpec, bool], nn.Sequential]
MODELS: Registry[ModelBuilder] = Registry("model", key="model.architecture", plugin_group="ctbench.models")


def _conv_stack(spec: InputSpec, batch_norm: bool, convs, linear_widths) -> nn.Sequential:
    """Convs (out, kernel, stride, padding), then linear layers, each but the last followed by
    (BatchNorm and) ReLU."""
    layers: list[nn.Module] = [Normalize(spec.mean, spec.std)]
    channels, size = spec.channels, spec.size
    for out_channels, kernel, stride, padding in convs:
        layers.append(nn.Conv2d(channels, out_channels, kernel, stride, padding))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        channels, size = out_channels, (size + 2 * padding - kernel) // stride + 1
    layers.append(nn.Flatten())
    features = channels * size * size
    widths = list(linear_widths) + [spec.classes]
    for index, width in enumerate(widths):
        layers.append(nn.Linear(features, width))
        if index < len(widths) - 1:
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
        features = width
    return nn.Sequential(*layers)


@MODELS.register("cnn3")
def cnn3(spec: InputSpec, batch_norm: bool) -> nn.Sequential:
    return _conv_stack(spec, batch_norm, [(16, 5, 2, 2), (32, 4, 2, 1)], [])


@MODELS.register("cnn5")
def cnn5(spec: InputSpec, batch_norm: bool) -> nn.Sequential:
    return _conv_stack(spec, batch_norm, [(16, 3, 1, 1), (16, 4, 2, 1), (32, 4, 2, 1)], [512])


@MODELS.register("cnn7")
def cnn7(spec: InputSpec, batch_norm: bool) -> nn.Sequential:
    # The TinyImageNet variant doubles the stride of the last conv to keep the linear layer small.
    last_stride = 2 if spec.size >= 64 else 1
    convs = [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, last_stride, 1)]
    return _conv_stack(spec, batch_norm, convs, [512])


def build_model(name: str, spec: InputSpec, batch_norm: bool = True) -> nn.Sequential:
    return MODELS.get(name)(spec, batch_norm)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
