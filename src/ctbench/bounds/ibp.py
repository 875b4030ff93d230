"""Interval bound propagation (Gowal et al. 2018), one rule per op type.

Affine ops map the box in center/radius form: center -> W c + b, radius -> |W| r. ReLU maps
[l, u] to [relu(l), relu(u)]; with ``relu_shrink = s < 1`` the upper bound of unstable neurons
(l < 0 < u) becomes s * u (SABR's ReLU shrink, an unsound training-time device).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.ops import ChannelAffineOp, ConvOp, FlattenOp, LinearOp, Op, ReluOp
from .box import Box


@dataclass(frozen=True)
class IBPOptions:
    relu_shrink: float = 1.0


def _ibp_linear(op: LinearOp, box: Box, options: IBPOptions) -> Box:
    center = F.linear(box.center, op.weight, op.bias)
    radius = F.linear(box.radius, op.weight.abs())
    return Box.from_center_radius(center, radius)


def _ibp_conv(op: ConvOp, box: Box, options: IBPOptions) -> Box:
    center = F.conv2d(box.center, op.weight, op.bias, op.stride, op.padding)
    radius = F.conv2d(box.radius, op.weight.abs(), None, op.stride, op.padding)
    return Box.from_center_radius(center, radius)


def _ibp_channel_affine(op: ChannelAffineOp, box: Box, options: IBPOptions) -> Box:
    ndim = box.lower.dim()
    center = op(box.center)
    radius = box.radius * op.broadcast(op.scale.abs(), ndim)
    return Box.from_center_radius(center, radius)


def _ibp_relu(op: ReluOp, box: Box, options: IBPOptions) -> Box:
    upper = torch.relu(box.upper)
    if options.relu_shrink != 1.0:
        unstable = (box.lower < 0) & (box.upper > 0)
        upper = torch.where(unstable, upper * options.relu_shrink, upper)
    return Box(torch.relu(box.lower), upper)


def _ibp_flatten(op: FlattenOp, box: Box, options: IBPOptions) -> Box:
    return Box(box.lower.flatten(1), box.upper.flatten(1))


IBP_RULES: dict[type, Callable[[Op, Box, IBPOptions], Box]] = {
    LinearOp: _ibp_linear,
    ConvOp: _ibp_conv,
    ChannelAffineOp: _ibp_channel_affine,
    ReluOp: _ibp_relu,
    FlattenOp: _ibp_flatten,
}


def ibp_step(op: Op, box: Box, options: IBPOptions = IBPOptions()) -> Box:
    return IBP_RULES[type(op)](op, box, options)


def interval_bounds(ops: Sequence[Op], box: Box, options: IBPOptions = IBPOptions()) -> list[Box]:
    """Boxes after every op: result[i] bounds the output of ops[i]; result[-1] bounds the logits."""
    boxes = []
    for op in ops:
        box = ibp_step(op, box, options)
        boxes.append(box)
    return boxes


def elided_margin_box(last: LinearOp, box: Box, labels: Tensor) -> Box:
    """Bounds of the margins z_y - z_i with the margin spec multiplied into the last linear
    layer (last-layer elision): radius |W_y - W_i| r instead of bounding the logits
    separately. Shape (B, K); entry y is exactly 0.

    With few classes the K x K pair differences W_j - W_i are formed once and applied to the
    whole batch as one matrix product; with many classes (K > B) per-sample rows are cheaper."""
    weight = last.weight
    classes, batch = weight.shape[0], labels.shape[0]
    logits_center = F.linear(box.center, weight, last.bias)
    margin_center = logits_center.gather(1, labels.unsqueeze(1)) - logits_center
    if classes <= batch:
        pair_abs = (weight.unsqueeze(1) - weight.unsqueeze(0)).abs().flatten(0, 1)  # row j*K+i: |W_j - W_i|
        radius_all = F.linear(box.radius, pair_abs).view(batch, classes, classes)
        margin_radius = radius_all[torch.arange(batch, device=labels.device), labels]
    else:
        weight_diff = weight[labels].unsqueeze(1) - weight.unsqueeze(0)  # (B, K, n)
        margin_radius = torch.einsum("bkn,bn->bk", weight_diff.abs(), box.radius)
    return Box.from_center_radius(margin_center, margin_radius)


def elided_margin_lower(last: LinearOp, box: Box, labels: Tensor) -> Tensor:
    """Lower bounds of z_y - z_i by last-layer elision (``elided_margin_box``), shape (B, K)."""
    return elided_margin_box(last, box, labels).lower


def margin_lower_from_logits(logits_box: Box, labels: Tensor) -> Tensor:
    """lb(z_y - z_i) = l_y - u_i from a box on the logits (no elision); entry y is 0."""
    lower_y = logits_box.lower.gather(1, labels.unsqueeze(1))
    margins = lower_y - logits_box.upper
    return margins.scatter(1, labels.unsqueeze(1), 0.0)


def ibp_margin_lower(ops: Sequence[Op], box: Box, labels: Tensor, options: IBPOptions = IBPOptions(),
                     ) -> tuple[Tensor, list[Box]]:
    """IBP lower bounds on the margins z_y - z_i (last-layer elision when the network ends in a
    linear layer) and the boxes of every layer before the last."""
    if isinstance(ops[-1], LinearOp):
        boxes = interval_bounds(ops[:-1], box, options)
        return elided_margin_lower(ops[-1], boxes[-1] if boxes else box, labels), boxes
    boxes = interval_bounds(ops, box, options)
    return margin_lower_from_logits(boxes[-1], labels), boxes[:-1]
