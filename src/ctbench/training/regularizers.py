"""Regularizers: L1 on affine weights, and the warm-up regularizer of Shi et al. (2021)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..bounds import Box
from ..models import Normalize
from ..models.ops import INPUT, Network, ReluOp, network_ops, source_of


def l1_penalty(model: nn.Module) -> Tensor:
    """sum |W| over the weights of Linear and Conv2d layers (no biases, no BatchNorm)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(w.abs().sum() for w in weights)


def shi_input_box(model: nn.Module, box: Box, space: str) -> Box:
    """The input box of the tightness term: after the network's normalization layer, its first
    child ("normalized", radius eps/std, as in Shi et al.'s code, where data is normalized before
    the net, and the reference), or the pixel-space box ("pixel")."""
    first = next(model.children(), None)
    if space == "pixel" or not isinstance(first, Normalize):
        return box
    return Box(first(box.lower), first(box.upper))


def own_sums(sums: Tensor) -> Tensor:
    """The sums of this process's batch alone (one-process training)."""
    return sums


def shi_warmup_penalty(ops: Network, input_box: Box, boxes: Sequence[Box], tolerance: float = 0.5,
                       total: Callable[[Tensor], Tensor] = own_sums) -> Tensor:
    """Shi et al. 2021, averaged over ReLU layers, from the IBP boxes of the pre-activations:

    * tightness: relu(tol - r_in / r_layer) / tol, with r the mean box radius (r_in that of
      ``input_box``, see ``shi_input_box``), which keeps bounds from growing faster than the
      input box through the layers;
    * ReLU balance: relu(tol - min(rho, 1/rho)) / tol for rho = ratio of the mean centre of
      active to (minus) inactive neurons, and again for the ratio of their spreads around the
      layer mean, which keeps IBP from killing one side of the ReLUs.

    ``boxes[i]`` bounds the output of node i; the input of a ReLU at i is the box of the node it
    reads (boxes[i - 1] in a chain); a ReLU on the network input adds no term. The
    means are batch-level, so every one is a sum divided by a count, and ``total`` turns a vector
    of this batch's sums into the sums the means are taken over: in data-parallel training, a
    differentiable all_reduce over the ranks, so the penalty is that of the global batch."""
    input_sum, input_count = total(torch.stack([input_box.radius.sum(), _count(input_box.radius)]))
    input_radius = input_sum / input_count
    tightness = input_radius.new_zeros(())
    balance = input_radius.new_zeros(())
    layers = 0
    for index, op in enumerate(network_ops(ops)):
        source = source_of(ops, index)
        if not isinstance(op, ReluOp) or source == INPUT or source >= len(boxes):
            continue
        radius_sum, active_sum, inactive_sum, spread_active, spread_inactive, count = _relu_layer_sums(boxes[source], total)
        tightness = tightness + torch.relu(tolerance - input_radius / (radius_sum / count).clamp(min=1e-12)) / tolerance
        term = input_radius.new_zeros(())
        for ratio in (active_sum / -inactive_sum, spread_active / spread_inactive):
            term = term + torch.relu(tolerance - torch.minimum(ratio, 1 / ratio.clamp(min=1e-12))) / tolerance
        # With no active (or no inactive) neuron the ratios are 0/0; such a layer adds no term.
        if torch.isfinite(term):
            balance = balance + term
        layers += 1
    return (tightness + balance) / max(layers, 1)


def _relu_layer_sums(pre: Box, total: Callable[[Tensor], Tensor]) -> tuple[Tensor, ...]:
    """Over the (global) batch, for the pre-activation box with centres c and radii r: the sums
    of r, of c over the active (l > 0) and the inactive (u < 0) neurons, of (c - m)^2 over each
    of the two, m the mean of c, and the count.

    Fewer passes over the activations than forming c, r and the spreads (1.6-1.9x faster on
    CNN7's conv layers), and one reduction over the ranks per layer: the spreads come
    from sums of c and c^2 (sum (c - m)^2 = sum c^2 - 2 m sum c + n m^2). That loses about
    (m / spread)^2 x 1e-7 of a float32 spread: much only where |m| is hundreds of spreads, where
    both balance ratios are near 0 and the penalty no longer depends on them."""
    lower, upper = pre.lower, pre.upper
    active, inactive = (lower > 0).to(lower.dtype), (upper < 0).to(lower.dtype)
    doubled_center = upper + lower  # 2c: the factors 2 and 4 go on the sums
    active_doubled, inactive_doubled = doubled_center * active, doubled_center * inactive
    upper_sum, lower_sum = upper.sum(), lower.sum()
    sums = total(torch.stack([(upper_sum - lower_sum) / 2, (upper_sum + lower_sum) / 2,
                              active_doubled.sum() / 2, (active_doubled * active_doubled).sum() / 4,
                              inactive_doubled.sum() / 2, (inactive_doubled * inactive_doubled).sum() / 4,
                              active.sum(), inactive.sum(), _count(lower)]))
    radius_sum, center_sum, active_sum, active_squares, inactive_sum, inactive_squares, actives, inactives, count = sums
    mean = center_sum / count
    spread_active = active_squares - 2 * mean * active_sum + actives * mean * mean
    spread_inactive = inactive_squares - 2 * mean * inactive_sum + inactives * mean * mean
    return radius_sum, active_sum, inactive_sum, spread_active, spread_inactive, count


def _count(values: Tensor) -> Tensor:
    return values.new_tensor(float(values.numel()))
