"""Interval bound propagation (Gowal et al. 2018), one rule per op type.

Affine ops map the box in center/radius form: center -> W c + b, radius -> |W| r. ReLU maps
[l, u] to [relu(l), relu(u)]; with ``relu_shrink = s < 1`` the upper bound of unstable neurons
(l < 0 < u) becomes s * u (SABR's ReLU shrink, an unsound training-time device). Average
pooling is linear with nonnegative weights, so it maps l and u themselves (exact, like any
elementwise-monotone map); max pooling is monotone in every input: [maxpool(l), maxpool(u)],
exact for each output neuron. Add: [l_a + l_b, u_a + u_b]; concatenation and reshapes move the
bounds along with the values.

On a DAG (``models.ops.Graph``) the rules run node by node in topological order; the rule of an
op of several inputs (``NARY_OPS``) takes the tuple of their boxes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.ops import (
    INPUT, NARY_OPS, AddOp, AvgPoolOp, ChannelAffineOp, ConcatOp, ConvOp, FlattenOp, LinearOp, MaxPoolOp, Network,
    Op, ReluOp, ReshapeOp, as_graph, network_ops, network_prefix, node_inputs, source_of,
)
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


def _ibp_monotone(op: ReshapeOp | AvgPoolOp | MaxPoolOp, box: Box, options: IBPOptions) -> Box:
    """[op(l), op(u)] for an op that is nondecreasing in every input (reshape, average and max
    pooling): exact per output neuron."""
    return Box(op(box.lower), op(box.upper))


def _ibp_add(op: AddOp, boxes: tuple[Box, Box], options: IBPOptions) -> Box:
    first, second = boxes
    return Box(first.lower + second.lower, first.upper + second.upper)


def _ibp_concat(op: ConcatOp, boxes: tuple[Box, ...], options: IBPOptions) -> Box:
    return Box(op(*(box.lower for box in boxes)), op(*(box.upper for box in boxes)))


IBP_RULES: dict[type, Callable[[Op, Box, IBPOptions], Box]] = {
    LinearOp: _ibp_linear,
    ConvOp: _ibp_conv,
    ChannelAffineOp: _ibp_channel_affine,
    ReluOp: _ibp_relu,
    FlattenOp: _ibp_flatten,
    ReshapeOp: _ibp_monotone,
    AvgPoolOp: _ibp_monotone,
    MaxPoolOp: _ibp_monotone,
    AddOp: _ibp_add,  # n-ary rules take the tuple of their input boxes
    ConcatOp: _ibp_concat,
}


def ibp_step(op: Op, box: Box, options: IBPOptions = IBPOptions()) -> Box:
    return IBP_RULES[type(op)](op, box, options)


def ibp_node(op: Op, boxes: Sequence[Box], options: IBPOptions = IBPOptions()) -> Box:
    """The box of a node's output from the boxes of its inputs."""
    return IBP_RULES[type(op)](op, tuple(boxes) if isinstance(op, NARY_OPS) else boxes[0], options)


def interval_bounds(network: Network, box: Box, options: IBPOptions = IBPOptions()) -> list[Box]:
    """Boxes after every op (node): result[i] bounds the output of node i; result[-1] bounds
    the logits."""
    boxes: list[Box] = []
    for node in as_graph(network).nodes:
        boxes.append(ibp_node(node.op, node_inputs(boxes, box, node), options))
    return boxes


def elision_input(network: Network, box: Box, options: IBPOptions = IBPOptions()) -> tuple[Box, list[Box]]:
    """For a network whose last op is Linear: the box of that op's input and the boxes of every
    node before it (``interval_bounds`` of the rest)."""
    boxes = interval_bounds(network_prefix(network, len(network) - 1), box, options)
    source = source_of(network, len(network) - 1)
    return (box if source == INPUT else boxes[source]), boxes


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


def ibp_margin_lower(network: Network, box: Box, labels: Tensor, options: IBPOptions = IBPOptions(),
                     ) -> tuple[Tensor, list[Box]]:
    """IBP lower bounds on the margins z_y - z_i (last-layer elision when the network ends in a
    linear layer) and the boxes of every layer before the last."""
    last = network_ops(network)[-1]
    if isinstance(last, LinearOp):
        features, boxes = elision_input(network, box, options)
        return elided_margin_lower(last, features, labels), boxes
    boxes = interval_bounds(network, box, options)
    return margin_lower_from_logits(boxes[-1], labels), boxes[:-1]
