"""Regularizers: L1 on affine weights, and the warm-up regularizer of Shi et al. (2021)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..bounds import Box
from ..models import Normalize
from ..models.ops import Op, ReluOp


def l1_penalty(model: nn.Module) -> Tensor:
    """sum |W| over the weights of Linear and Conv2d layers (no biases, no BatchNorm)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(w.abs().sum() for w in weights)


def shi_input_box(model: nn.Sequential, box: Box, space: str) -> Box:
    """The input box of the tightness term: after the network's normalization layer
    ("normalized", radius eps/std, as in Shi et al.'s code, where data is normalized before the
    net, and the reference), or the pixel-space box ("pixel")."""
    first = model[0]
    if space == "pixel" or not isinstance(first, Normalize):
        return box
    return Box(first(box.lower), first(box.upper))


def shi_warmup_penalty(ops: Sequence[Op], input_box: Box, boxes: Sequence[Box], tolerance: float = 0.5) -> Tensor:
    """Shi et al. 2021, averaged over ReLU layers, from the IBP boxes of the pre-activations:

    * tightness: relu(tol - r_in / r_layer) / tol, with r the mean box radius (r_in that of
      ``input_box``, see ``shi_input_box``), which keeps bounds from growing faster than the
      input box through the layers;
    * ReLU balance: relu(tol - min(rho, 1/rho)) / tol for rho = ratio of the mean centre of
      active to (minus) inactive neurons, and again for the ratio of their spreads around the
      layer mean, which keeps IBP from killing one side of the ReLUs.

    ``boxes[i]`` bounds the output of ``ops[i]``; the input of a ReLU at i is boxes[i - 1]."""
    input_radius = input_box.radius.mean()
    tightness = input_radius.new_zeros(())
    balance = input_radius.new_zeros(())
    layers = 0
    for index, op in enumerate(ops):
        if not isinstance(op, ReluOp) or index == 0 or index - 1 >= len(boxes):
            continue
        pre = boxes[index - 1]
        center, radius = pre.center, pre.radius
        tightness = tightness + torch.relu(tolerance - input_radius / radius.mean().clamp(min=1e-12)) / tolerance
        active, inactive = (pre.lower > 0).to(center.dtype), (pre.upper < 0).to(center.dtype)
        spread = (center - center.mean()) ** 2
        mean_ratio = (center * active).mean() / -(center * inactive).mean()
        spread_ratio = (spread * active).sum() / (spread * inactive).sum()
        term = input_radius.new_zeros(())
        for ratio in (mean_ratio, spread_ratio):
            term = term + torch.relu(tolerance - torch.minimum(ratio, 1 / ratio.clamp(min=1e-12))) / tolerance
        # With no active (or no inactive) neuron the ratios are 0/0; such a layer adds no term.
        if torch.isfinite(term):
            balance = balance + term
        layers += 1
    return (tightness + balance) / max(layers, 1)
