"""Weight initializations: the IBP init of Shi et al. (2021) and Kaiming uniform."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import Registry

INITS: Registry = Registry("initialization", key="model.init")


def _affine_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@INITS.register("ibp")
@torch.no_grad()
def ibp_init(model: nn.Module) -> None:
    """Shi et al. 2021: W ~ N(0, sigma^2) with sigma = sqrt(2 pi) / fan_in for every affine layer
    but the last, so the expected IBP radius neither grows nor shrinks through a layer; biases 0.
    The last layer keeps torch's default."""
    layers = _affine_layers(model)
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        nn.init.normal_(layer.weight, mean=0.0, std=math.sqrt(2 * math.pi) / fan_in)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


@INITS.register("kaiming")
@torch.no_grad()
def kaiming_init(model: nn.Module) -> None:
    """Kaiming uniform (He et al. 2015) for ReLU networks, biases 0."""
    for layer in _affine_layers(model):
        nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def initialize(model: nn.Module, name: str) -> None:
    INITS.get(name)(model)
