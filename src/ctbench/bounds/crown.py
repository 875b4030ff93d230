"""Backward linear bound propagation: CROWN (Zhang et al. 2018), CROWN-IBP (Zhang et al. 2020)
and alpha-CROWN (Xu et al. 2021), one backward rule per op type.

Notation. The network is a sequence of ops h_{k+1} = op_k(h_k), h_0 = x in the input box
[l_0, u_0], and the specification is a matrix C (S rows over the K logits). We want a lower
bound of every row of C f(x) over the box.

A linear bound ``LinearBound(A, bias)`` *at layer k* is the statement

    C f(x) >= A . h_k(x) + bias      for every x in the box (and in the split subdomain),

with A of shape (B, S, *shape of h_k) and bias (B, S); "." sums over the layer's dims. The
backward pass starts at the logits with (A, bias) = (C, 0) and moves the bound one op at a time
towards the input (``BACKWARD_RULES``):

* Linear  h' = W h + b:               A <- A W,  bias <- bias + A b.
* Conv2d  h' = conv(h, W) + b:        A <- conv_transpose2d(A, W) (the adjoint of the conv, with
  the output padding that restores the input's height and width),  bias <- bias + sum A b_c.
* ChannelAffine  h' = s_c h + t_c:    A <- s_c A,  bias <- bias + sum A t_c.
* Flatten, Reshape:                   A <- A reshaped to the input shape.
* AvgPool (linear, weights 1/(kh kw)): A <- its adjoint (a transposed depthwise convolution).
* Add  h' = a + b:                    A goes to both inputs unchanged.
* Concat (channels):                  A is split along its channel dim, one part per input.
* MaxPool  y = max_{i in window} h_i, with bounds l <= h <= u (DeepPoly, Singh et al. 2019):
  let i* be the input of the window with the largest lower bound. Then
      h_{i*} <= y                                  (y is the max of the window),
      y <= h_{i*}        if l_{i*} >= u_j for every other j of the window (i* dominates: y = h_{i*}),
      y <= max_j u_j     otherwise (a constant upper line).
  A lower bound of A y takes the lower line where A >= 0 and the upper one where A < 0.
* ReLU   h' = relu(h), with pre-activation bounds l <= h <= u: each neuron is sandwiched
  between two lines  a_lo h <= relu(h) <= a_up h + b_up:
    - active (l >= 0): both lines are h; inactive (u <= 0): both are 0 (exact);
    - unstable (l < 0 < u): upper line u/(u-l) (h - l) (the chord), lower line alpha h with any
      alpha in [0, 1] (``adaptive`` default: alpha = 1 if u > -l else 0).
  A lower bound of A . relu(h) takes the lower line where A >= 0 and the upper line where A < 0:
      A <- A+ a_lo + A- a_up,  bias <- bias + A- . b_up.
  Every alpha in [0, 1] gives a sound bound; alpha-CROWN optimizes alpha per neuron and spec row.

At the input the bound is concretized in center/radius form (c, r) of the L_inf box:

    min_{x in box} A . x + bias = A . c - |A| . r + bias.

Upper bounds are lower bounds of -C: ``crown_upper_bounds``.

On a DAG (``models.ops.Graph``) the bound moves node by node in reverse topological order: each
node collects the sum of the A's its readers pass back (``SPLIT_RULES`` give an op of several
inputs one A per input), and the biases add up. A chain is the graph whose node k reads k - 1.

Pre-activation bounds (l, u) of every ReLU and max-pool input (the *nonlinear* nodes) are
``intermediate`` bounds, a dict from the node's index to the Box of its input, passed in and
returned as plain values:

* mode "ibp" / "crown-ibp": IBP boxes (CROWN-IBP: IBP for the intermediate layers, CROWN for the
  specification);
* mode "crown": each ReLU input is bounded by CROWN itself, backward from that layer with an
  identity specification (rows +e_j and -e_j for its neurons, in chunks of rows to bound
  memory), using the relaxations of the ReLUs before it. The result is intersected with IBP
  (both are sound, so is the tighter of the two), and IBP continues forward from the tightened
  box. Only neurons that IBP leaves unstable (in some sample of the batch) are bounded by CROWN
  (``unstable_only``): a stable neuron's relaxation is exact whatever its bounds. ``crown_layers``
  restricts CROWN to chosen ReLUs (the others keep IBP), because on wide conv layers it costs
  about one backward pass per neuron. Where IBP is already exact (no ReLU before the layer and
  a single Linear/Conv among per-channel affine maps, ``ibp_is_exact``) CROWN is skipped.

A BatchNorm/Normalize affine map right after a Linear/Conv is folded into its weights while a
bound moves through the pair (``FOLD_RULES``): the same bound in one pass over A.

Branch-and-bound splits are a dict from a ReLU's op index to a tensor in {-1, 0, +1} of the
shape of its input (with or without the batch dim): -1 restricts the subdomain to h <= 0
(u <- min(u, 0)), +1 to h >= 0 (l <- max(l, 0)), 0 leaves the neuron free. They act only by
tightening the intermediate boxes (``apply_split``), so every function here takes them and the
bounds hold for every input of the box whose pre-activations satisfy the splits. An
infeasible split can leave l > u; the relaxation then treats the neuron as stable, which is
vacuously sound (the subdomain is empty).

Everything is differentiable (CROWN-IBP training backpropagates through ``crown_bounds``),
except ``alpha_crown``, which optimizes the slopes and returns detached bounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.ops import (
    INPUT, NARY_OPS, AddOp, AvgPoolOp, ChannelAffineOp, ConcatOp, ConvOp, FlattenOp, Graph, LinearOp, MaxPoolOp,
    Network, Op, ReluOp, ReshapeOp, as_graph, network_ops, node_inputs,
)
from .box import Box
from .ibp import ibp_node
from .spec import margin_spec

IntermediateBounds = dict[int, Box]
Splits = Mapping[int, Tensor]
Alphas = Mapping[int, Tensor]

MODES = ("ibp", "crown-ibp", "crown")
DEFAULT_MAX_ELEMENTS = 2 ** 25  # elements of one A tensor while bounding intermediate layers


# ----------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, eq=False)
class LinearBound:
    """C f(x) >= A . h(x) + bias for a layer h: A (B, S, *layer shape), bias (B, S).

    The batch dim of A (and bias) may be 1 and broadcast over the batch of the box."""

    A: Tensor
    bias: Tensor


@dataclass(frozen=True, eq=False)
class ReluRelaxation:
    """Lines a_lo h <= relu(h) <= a_up h + b_up for every neuron. Shapes (B, 1 or S, *shape):
    the lower slope may differ per spec row (alpha-CROWN); the upper line never does."""

    lower_slope: Tensor
    upper_slope: Tensor
    upper_intercept: Tensor


@dataclass(frozen=True, eq=False)
class MaxPoolRelaxation:
    """The lines of every max-pool output neuron (module docstring): ``choice`` (B, 1, C, kh kw,
    L) one-hot of i* within each of the L windows; ``dominated`` (B, 1, C, H_out, W_out) 1 where
    i* dominates (upper line h_{i*}), else 0; ``upper`` (same shape) the constant upper line
    max_j u_j where i* does not dominate, 0 where it does."""

    choice: Tensor
    dominated: Tensor
    upper: Tensor


@dataclass(frozen=True, eq=False)
class BackwardContext:
    """What a backward rule needs besides the op: the per-sample shape of the op's input (of
    each input, ``input_shapes``, for an op of several) and, for a ReLU or a max pool, its
    relaxation."""

    input_shape: tuple[int, ...]
    relaxation: ReluRelaxation | MaxPoolRelaxation | None = None
    input_shapes: tuple[tuple[int, ...], ...] = ()


# ----------------------------------------------------------------------------------------------
# Shapes


def _conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _shape_linear(op: LinearOp, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (op.weight.shape[0],)


def _shape_conv(op: ConvOp, shape: tuple[int, ...]) -> tuple[int, ...]:
    _, height, width = shape
    kh, kw = op.weight.shape[2:]
    return (op.weight.shape[0], _conv_output_size(height, kh, op.stride[0], op.padding[0]),
            _conv_output_size(width, kw, op.stride[1], op.padding[1]))


def _shape_pool(op: AvgPoolOp | MaxPoolOp, shape: tuple[int, ...]) -> tuple[int, ...]:
    channels, height, width = shape
    return (channels, *(_conv_output_size(size, kernel, stride, padding) for size, kernel, stride, padding
                        in zip((height, width), op.kernel, op.stride, op.padding)))


def _shape_reshape(op: ReshapeOp, shape: tuple[int, ...]) -> tuple[int, ...]:
    known = math.prod(size for size in op.shape if size != -1)
    return tuple(math.prod(shape) // known if size == -1 else size for size in op.shape)


SHAPE_RULES: dict[type, Callable[[Op, tuple[int, ...]], tuple[int, ...]]] = {
    LinearOp: _shape_linear,
    ConvOp: _shape_conv,
    ChannelAffineOp: lambda op, shape: shape,
    ReluOp: lambda op, shape: shape,
    FlattenOp: lambda op, shape: (math.prod(shape),),
    ReshapeOp: _shape_reshape,
    AvgPoolOp: _shape_pool,
    MaxPoolOp: _shape_pool,
    AddOp: lambda op, shapes: shapes[0],  # n-ary rules take the tuple of their input shapes
    ConcatOp: lambda op, shapes: (sum(shape[0] for shape in shapes), *shapes[0][1:]),
}


def output_shapes(network: Network, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample shape of every node's output."""
    shapes: list[tuple[int, ...]] = []
    for node in as_graph(network).nodes:
        inputs = node_inputs(shapes, tuple(input_shape), node)
        shapes.append(tuple(SHAPE_RULES[type(node.op)](node.op, tuple(inputs) if isinstance(node.op, NARY_OPS)
                                                         else inputs[0])))
    return shapes


def layer_shapes(network: Network, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample shapes: result[k] is the shape of the (first) input of node k; result[-1] the
    output."""
    graph = as_graph(network)
    outputs = output_shapes(graph, input_shape)
    firsts = [tuple(input_shape) if node.inputs[0] == INPUT else outputs[node.inputs[0]] for node in graph.nodes]
    return firsts + [outputs[-1] if outputs else tuple(input_shape)]


# ----------------------------------------------------------------------------------------------
# ReLU relaxation and splits


def adaptive_alpha(pre: Box) -> Tensor:
    """The CROWN default lower slope: 1 where u > -l (the line y = x loses less area), else 0."""
    return (pre.upper > -pre.lower).to(pre.lower.dtype)


def relu_relaxation(pre: Box, alpha: Tensor | None = None) -> ReluRelaxation:
    """Linear relaxation of relu on [l, u] (shape (B, *shape)), see the module docstring.

    ``alpha`` (broadcastable to (B, S, *shape), e.g. (B, S, *shape) or (B, 1, *shape)) is the
    lower slope of the unstable neurons; it is clamped to [0, 1], so any value gives a sound
    bound. None: the adaptive choice."""
    lower, upper = pre.lower.unsqueeze(1), pre.upper.unsqueeze(1)
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    chord = upper / width
    one, zero = torch.ones_like(lower), torch.zeros_like(lower)
    upper_slope = torch.where(unstable, chord, torch.where(active, one, zero))
    upper_intercept = torch.where(unstable, -chord * lower, zero)
    if alpha is None:
        alpha = adaptive_alpha(pre).unsqueeze(1)
    alpha = alpha.clamp(0.0, 1.0)
    lower_slope = torch.where(unstable, alpha, torch.where(active, one, zero))
    return ReluRelaxation(lower_slope, upper_slope, upper_intercept)


def pool_windows(op: MaxPoolOp, x: Tensor) -> Tensor:
    """The pooling windows of x (B, C, H, W), padded with -inf: (B, C, kh kw, L)."""
    pad_height, pad_width = op.padding
    padded = F.pad(x, (pad_width, pad_width, pad_height, pad_height), value=-math.inf)
    return F.unfold(padded, op.kernel, stride=op.stride).view(x.shape[0], x.shape[1], math.prod(op.kernel), -1)


def maxpool_relaxation(op: MaxPoolOp, pre: Box) -> MaxPoolRelaxation:
    """The DeepPoly lines of max pooling over the input box ``pre`` (B, C, H, W), see the
    module docstring: i* is the window's input with the largest lower bound (the first on ties)."""
    lower, upper = pool_windows(op, pre.lower), pool_windows(op, pre.upper)
    best_lower, chosen = lower.max(dim=2, keepdim=True)
    choice = torch.zeros_like(lower).scatter(2, chosen, 1.0)
    others_upper = upper.masked_fill(choice.bool(), -math.inf).amax(dim=2)
    dominated = best_lower.squeeze(2) >= others_upper
    out_shape = (pre.lower.shape[0], 1, *_shape_pool(op, tuple(pre.lower.shape[1:])))
    window_upper = torch.where(dominated, torch.zeros_like(others_upper), upper.amax(dim=2))
    return MaxPoolRelaxation(choice.unsqueeze(1), dominated.to(lower.dtype).view(out_shape),
                             window_upper.view(out_shape))


RELAXATIONS: dict[type, Callable[[Op, Box, Tensor | None], ReluRelaxation | MaxPoolRelaxation]] = {
    ReluOp: lambda op, pre, alpha: relu_relaxation(pre, alpha),
    MaxPoolOp: lambda op, pre, alpha: maxpool_relaxation(op, pre),
}
NONLINEAR_OPS = tuple(RELAXATIONS)  # the ops whose backward rule needs bounds of their input


def relax(op: Op, pre: Box, alpha: Tensor | None = None) -> ReluRelaxation | MaxPoolRelaxation:
    """The relaxation of a nonlinear op over its input box (``alpha``: ReLU lower slopes)."""
    return RELAXATIONS[type(op)](op, pre, alpha)


def apply_split(pre: Box, split: Tensor | None) -> Box:
    """Tighten a pre-activation box by a split mask in {-1, 0, +1} (module docstring)."""
    if split is None:
        return pre
    split = split.to(device=pre.lower.device)
    lower = torch.where(split > 0, pre.lower.clamp(min=0), pre.lower)
    upper = torch.where(split < 0, pre.upper.clamp(max=0), pre.upper)
    return Box(lower, upper)


def apply_splits(intermediate: Mapping[int, Box], split: Splits | None) -> IntermediateBounds:
    """Every intermediate box tightened by its split mask (a new dict; boxes without a mask kept)."""
    if not split:
        return dict(intermediate)
    return {index: apply_split(pre, split.get(index)) for index, pre in intermediate.items()}


# ----------------------------------------------------------------------------------------------
# Backward rules


def _channel_view(vector: Tensor, ndim: int) -> Tensor:
    """A per-channel vector viewed to broadcast against A of ``ndim`` dims (channel dim 2)."""
    return vector.view(1, 1, -1, *([1] * (ndim - 3)))


def _backward_linear(op: LinearOp, bound: LinearBound, ctx: BackwardContext) -> LinearBound:
    bias = bound.bias
    if op.bias is not None:
        bias = bias + bound.A.matmul(op.bias)
    return LinearBound(bound.A.matmul(op.weight), bias)


def _output_padding(input_shape: tuple[int, ...], A: Tensor, stride, padding, kernel) -> tuple[int, int]:
    """conv_transpose2d yields (H_out - 1) s - 2 p + k rows; the forward conv (or pooling)
    dropped the last (H_in + 2 p - k) mod s input rows, which output_padding gives back (as
    zeros of A)."""
    return tuple(size_in - ((size_out - 1) * step - 2 * pad + size)
                 for size_in, size_out, step, pad, size in zip(input_shape[1:], A.shape[3:], stride, padding, kernel))


def _backward_conv(op: ConvOp, bound: LinearBound, ctx: BackwardContext) -> LinearBound:
    A = bound.A
    batch, rows = A.shape[:2]
    out_channels, out_height, out_width = A.shape[2:]
    in_channels, in_height, in_width = ctx.input_shape
    output_padding = _output_padding(ctx.input_shape, A, op.stride, op.padding, op.weight.shape[2:])
    flat = A.reshape(batch * rows, out_channels, out_height, out_width)
    A_in = F.conv_transpose2d(flat, op.weight, None, op.stride, op.padding, output_padding)
    bias = bound.bias
    if op.bias is not None:
        bias = bias + A.sum(dim=(3, 4)).matmul(op.bias)
    return LinearBound(A_in.reshape(batch, rows, in_channels, in_height, in_width), bias)


def _backward_channel_affine(op: ChannelAffineOp, bound: LinearBound, ctx: BackwardContext) -> LinearBound:
    A = bound.A
    per_channel = A.flatten(3).sum(-1) if A.dim() > 3 else A  # (B, S, C)
    return LinearBound(A * _channel_view(op.scale, A.dim()), bound.bias + per_channel.matmul(op.shift))


def _backward_reshape(op: FlattenOp | ReshapeOp, bound: LinearBound, ctx: BackwardContext) -> LinearBound:
    A = bound.A
    return LinearBound(A.reshape(A.shape[0], A.shape[1], *ctx.input_shape), bound.bias)


def _backward_avg_pool(op: AvgPoolOp, bound: LinearBound, ctx: BackwardContext) -> LinearBound:
    """A <- the adjoint of the pooling: a transposed depthwise convolution of weights 1/(kh kw)."""
    A = bound.A
    batch, rows, channels = A.shape[:3]
    weight = A.new_full((channels, 1, *op.kernel), 1.0 / math.prod(op.kernel))
    output_padding = _output_padding(ctx.input_shape, A, op.stride, op.padding, op.kernel)
    A_in = F.conv_transpose2d(A.reshape(batch * rows, *A.shape[2:]), weight, None, op.stride, op.padding,
                              output_padding, groups=channels)
    return LinearBound(A_in.reshape(batch, rows, *ctx.input_shape), bound.bias)


def fold_windows(op: MaxPoolOp, windows: Tensor, input_shape: tuple[int, ...]) -> Tensor:
    """The adjoint of ``pool_windows``: per-window entries (B, S, C, kh kw, L) summed back onto the
    input positions, (B, S, *input_shape); the padding is cut off."""
    batch, rows, channels = windows.shape[:3]
    _, height, width = input_shape
    pad_height, pad_width = op.padding
    folded = F.fold(windows.reshape(batch * rows, channels * windows.shape[3], windows.shape[4]),
                    (height + 2 * pad_height, width + 2 * pad_width), op.kernel, stride=op.stride)
    return folded[:, :, pad_height:pad_height + height, pad_width:pad_width + width].reshape(
        batch, rows, channels, height, width)


def _backward_max_pool(op: MaxPoolOp, bound: LinearBound, ctx: BackwardContext) -> LinearBound:
    """A+ takes the lower line h_{i*}, A- the upper line: h_{i*} where i* dominates, else the
    constant max_j u_j (module docstring)."""
    relax = ctx.relaxation
    if relax is None:
        raise ValueError("a max pool needs bounds of its input (intermediate) for backward propagation")
    A = bound.A
    negative = A.clamp(max=0)
    coefficient = A.clamp(min=0) + negative * relax.dominated
    bias = bound.bias + (negative * relax.upper).flatten(2).sum(-1)
    windows = coefficient.flatten(3).unsqueeze(3) * relax.choice
    return LinearBound(fold_windows(op, windows, ctx.input_shape), bias)


def _backward_relu(op: ReluOp, bound: LinearBound, ctx: BackwardContext) -> LinearBound:
    relax = ctx.relaxation
    if relax is None:
        raise ValueError("a ReLU needs pre-activation bounds (intermediate) for backward propagation")
    A = bound.A
    positive, negative = A.clamp(min=0), A.clamp(max=0)
    A_in = positive * relax.lower_slope + negative * relax.upper_slope
    bias = bound.bias + (negative * relax.upper_intercept).flatten(2).sum(-1)
    return LinearBound(A_in, bias)


BACKWARD_RULES: dict[type, Callable[[Op, LinearBound, BackwardContext], LinearBound]] = {
    LinearOp: _backward_linear,
    ConvOp: _backward_conv,
    ChannelAffineOp: _backward_channel_affine,
    FlattenOp: _backward_reshape,
    ReshapeOp: _backward_reshape,
    AvgPoolOp: _backward_avg_pool,
    MaxPoolOp: _backward_max_pool,
    ReluOp: _backward_relu,
}


def _split_add(op: AddOp, A: Tensor, ctx: BackwardContext) -> tuple[Tensor, ...]:
    return (A, A)


def _split_concat(op: ConcatOp, A: Tensor, ctx: BackwardContext) -> tuple[Tensor, ...]:
    return tuple(A.split([shape[0] for shape in ctx.input_shapes], dim=2))


# The backward rules of the ops of several inputs: the A of each input. Add and concatenation
# are exact and add no bias (and no rounding: the rigorous engine uses them as they are).
SPLIT_RULES: dict[type, Callable[[Op, Tensor, BackwardContext], tuple[Tensor, ...]]] = {
    AddOp: _split_add,
    ConcatOp: _split_concat,
}


def _fold_into_linear(op: LinearOp, affine: ChannelAffineOp) -> LinearOp:
    bias = affine.shift if op.bias is None else op.bias * affine.scale + affine.shift
    return LinearOp(op.weight * affine.scale.unsqueeze(1), bias)


def _fold_into_conv(op: ConvOp, affine: ChannelAffineOp) -> ConvOp:
    bias = affine.shift if op.bias is None else op.bias * affine.scale + affine.shift
    return ConvOp(op.weight * affine.scale.view(-1, 1, 1, 1), bias, op.stride, op.padding)


# A per-channel affine map right after a Linear/Conv (BatchNorm) is folded into its weights
# before moving a bound through the pair: the same bound, one pass over A instead of three.
FOLD_RULES: dict[type, Callable[[Op, ChannelAffineOp], Op]] = {
    LinearOp: _fold_into_linear,
    ConvOp: _fold_into_conv,
}


ReluHook = Callable[[int, Tensor, LinearBound], LinearBound]


def walk_backward(graph: Graph, A: Tensor, move: Callable[[int, Tensor], Sequence[tuple[int, Tensor]]],
                  add: Callable[[int, Tensor, Tensor], Tensor] | None = None) -> Tensor | None:
    """Reverse topological walk of a DAG: node k's A is the sum of what its readers passed back
    (the output node starts with ``A``); ``move(k, A)`` returns (input index, A) pairs;
    ``add(k, A so far, part)`` sums two parts for node k (default: +). Returns the A at the
    network input (None when the output does not depend on it)."""
    pending: dict[int, Tensor] = {len(graph) - 1: A}
    for index in range(len(graph) - 1, -1, -1):
        node_A = pending.pop(index, None)
        if node_A is None:
            continue
        for source, part in move(index, node_A):
            if source not in pending:
                pending[source] = part
            else:
                pending[source] = pending[source] + part if add is None else add(source, pending[source], part)
    return pending.get(INPUT)


def _fold_partner(graph: Graph, readers: list[int], index: int) -> int | None:
    """The Linear/Conv node that the affine node ``index`` can be folded into, if any: its
    input, read by nothing else."""
    node = graph.nodes[index]
    source = node.inputs[0]
    if (isinstance(node.op, ChannelAffineOp) and source != INPUT and readers[source] == 1
            and type(graph.nodes[source].op) in FOLD_RULES):
        return source
    return None


def backward(network: Network, bound: LinearBound, input_shape: tuple[int, ...],
             relaxations: Mapping[int, ReluRelaxation | MaxPoolRelaxation],
             after_relu: ReluHook | None = None) -> LinearBound:
    """Move a linear bound on the output of ``network`` to its input (``input_shape`` per
    sample); ``relaxations[k]`` relaxes the ReLU or max pool of node k. Affine maps after a
    Linear/Conv read by nothing else are folded into it (``FOLD_RULES``). ``after_relu(k, A at
    the ReLU's output, bound at its input)`` may adjust the bound right after each ReLU (branch
    and bound prices split constraints there)."""
    graph = as_graph(network)
    outputs = output_shapes(graph, input_shape)
    readers = graph.consumers()
    bias = bound.bias

    def move(index: int, A: Tensor) -> list[tuple[int, Tensor]]:
        nonlocal bias
        op, inputs = graph.nodes[index].op, graph.nodes[index].inputs
        partner = _fold_partner(graph, readers, index)
        if partner is not None:
            producer = graph.nodes[partner]
            op, inputs = FOLD_RULES[type(producer.op)](producer.op, op), producer.inputs
        shapes = tuple(tuple(input_shape) if source == INPUT else outputs[source] for source in inputs)
        ctx = BackwardContext(shapes[0], relaxations.get(index), shapes)
        if isinstance(op, NARY_OPS):
            return list(zip(inputs, SPLIT_RULES[type(op)](op, A, ctx)))
        moved = BACKWARD_RULES[type(op)](op, LinearBound(A, bias), ctx)
        if after_relu is not None and isinstance(op, ReluOp):
            moved = after_relu(index, A, moved)
        bias = moved.bias
        return [(inputs[0], moved.A)]

    input_A = walk_backward(graph, bound.A, move)
    if input_A is None:
        input_A = bound.A.new_zeros(1, bound.A.shape[1], *input_shape)
    return LinearBound(input_A, bias)


def concretize_lower(bound: LinearBound, box: Box) -> Tensor:
    """min over the box of A . x + bias = A . c - |A| . r + bias, shape (B, S)."""
    A = bound.A.flatten(2)
    center = box.center.flatten(1).unsqueeze(-1)
    radius = box.radius.flatten(1).unsqueeze(-1)
    return A.matmul(center).squeeze(-1) - A.abs().matmul(radius).squeeze(-1) + bound.bias


# ----------------------------------------------------------------------------------------------
# Intermediate bounds


INEXACT_FOR_IBP = (ReluOp, MaxPoolOp, AddOp, AvgPoolOp)


def ibp_is_exact(network: Network) -> bool:
    """IBP is exact for at most one Linear/Conv composed with per-channel affine maps, reshapes
    and concatenations (|D1 W D2| = |D1| |W| |D2| for diagonal D; a concatenation keeps every
    output a function of its own branch), so CROWN cannot improve on it there. Sums (add,
    average pooling) and nonlinear ops are not exact."""
    ops = network_ops(network)
    if any(isinstance(op, INEXACT_FOR_IBP) for op in ops):
        return False
    return sum(isinstance(op, (LinearOp, ConvOp)) for op in ops) <= 1


def _crown_preactivation(ops: Network, box: Box, relaxations: Mapping[int, ReluRelaxation | MaxPoolRelaxation],
                         pre: Box, unstable_only: bool, max_elements: int) -> Box:
    """CROWN bounds of the output of ``ops`` (a ReLU or max-pool input whose IBP box is ``pre``),
    intersected with ``pre``. Rows +e_j (lower bound) and -e_j (minus the upper bound) are
    propagated in chunks so that one A tensor holds at most ``max_elements`` elements."""
    batch = box.lower.shape[0]
    shape = tuple(pre.lower.shape[1:])
    neurons = math.prod(shape)
    ibp_lower, ibp_upper = pre.lower.flatten(1), pre.upper.flatten(1)
    if unstable_only:
        chosen = ((ibp_lower < 0) & (ibp_upper > 0)).any(dim=0).nonzero().squeeze(1)
    else:
        chosen = torch.arange(neurons, device=ibp_lower.device)
    if chosen.numel() == 0:
        return pre
    widest = max(math.prod(s) for s in [tuple(box.lower.shape[1:]), *output_shapes(ops, tuple(box.lower.shape[1:]))])
    rows_per_chunk = max(1, max_elements // (2 * batch * widest))
    lowers, uppers = [], []
    for chunk in chosen.split(rows_per_chunk):
        count = chunk.numel()
        eye = torch.zeros(count, neurons, dtype=ibp_lower.dtype, device=ibp_lower.device)
        eye[torch.arange(count, device=chunk.device), chunk] = 1.0
        # Batch dim 1: the rows are the same for every sample until the first ReLU broadcasts.
        A = torch.cat([eye, -eye]).reshape(1, 2 * count, *shape)
        bias = torch.zeros(1, 2 * count, dtype=A.dtype, device=A.device)
        bound = backward(ops, LinearBound(A, bias), tuple(box.lower.shape[1:]), relaxations)
        lower = concretize_lower(bound, box).expand(batch, -1)
        lowers.append(lower[:, :count])
        uppers.append(-lower[:, count:])
    crown_lower, crown_upper = torch.cat(lowers, dim=1), torch.cat(uppers, dim=1)
    new_lower, new_upper = ibp_lower.clone(), ibp_upper.clone()
    new_lower[:, chosen] = torch.maximum(ibp_lower[:, chosen], crown_lower)
    new_upper[:, chosen] = torch.minimum(ibp_upper[:, chosen], crown_upper)
    return Box(new_lower.reshape(batch, *shape), new_upper.reshape(batch, *shape))


def relu_indices(network: Network) -> list[int]:
    return [index for index, op in enumerate(network_ops(network)) if isinstance(op, ReluOp)]


def nonlinear_indices(network: Network) -> list[int]:
    """The nodes whose backward rule needs bounds of their input: ReLUs and max pools."""
    return [index for index, op in enumerate(network_ops(network)) if isinstance(op, NONLINEAR_OPS)]


def intermediate_bounds(network: Network, box: Box, mode: str = "crown-ibp", *,
                        split: Splits | None = None, crown_layers: Collection[int] | None = None,
                        unstable_only: bool = True, max_elements: int = DEFAULT_MAX_ELEMENTS,
                        ) -> IntermediateBounds:
    """Boxes of every ReLU and max-pool input, keyed by the node's index (module docstring).

    mode "ibp"/"crown-ibp": IBP; "crown": CROWN intersected with IBP for the nodes in
    ``crown_layers`` (node indices; None: all), IBP for the others. Splits tighten each box as
    soon as it is computed, and a tightened box replaces the IBP box of the node it bounds, so
    later layers (every reader of that node) profit from it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    split = split or {}
    graph = as_graph(network)
    nonlinear = nonlinear_indices(graph)
    boxes: IntermediateBounds = {}
    relaxations: dict[int, ReluRelaxation | MaxPoolRelaxation] = {}
    outputs: list[Box] = []
    for index, node in enumerate(graph.nodes[:nonlinear[-1] + 1] if nonlinear else ()):
        if not isinstance(node.op, NONLINEAR_OPS):
            outputs.append(ibp_node(node.op, node_inputs(outputs, box, node)))
            continue
        source = node.inputs[0]
        pre = box if source == INPUT else outputs[source]
        if (mode == "crown" and (crown_layers is None or index in crown_layers) and source != INPUT
                and not ibp_is_exact(graph.prefix(source + 1))):
            pre = _crown_preactivation(graph.prefix(source + 1), box, relaxations, pre, unstable_only, max_elements)
        pre = apply_split(pre, split.get(index))
        boxes[index] = pre
        relaxations[index] = relax(node.op, pre)
        if source != INPUT:
            outputs[source] = pre
        outputs.append(ibp_node(node.op, [pre]))
    return boxes


# ----------------------------------------------------------------------------------------------
# CROWN on a specification


def _spec_bound(spec_C: Tensor, box: Box) -> LinearBound:
    C = spec_C.to(dtype=box.lower.dtype, device=box.lower.device)
    if C.dim() == 2:
        C = C.unsqueeze(0)
    return LinearBound(C, torch.zeros(C.shape[:2], dtype=C.dtype, device=C.device))


def _check_intermediate(network: Network, intermediate: Mapping[int, Box]) -> None:
    missing = [index for index in nonlinear_indices(network) if index not in intermediate]
    if missing:
        raise KeyError(f"no intermediate bounds for the ReLU / max-pool nodes {missing}")


def relaxations_of(network: Network, intermediate: Mapping[int, Box],
                   alphas: Alphas | None = None) -> dict[int, ReluRelaxation | MaxPoolRelaxation]:
    """The relaxation of every nonlinear node over its intermediate box (ReLU slopes ``alphas``)."""
    ops, alphas = network_ops(network), alphas or {}
    return {index: relax(ops[index], pre, alphas.get(index)) for index, pre in intermediate.items()}


def crown_bounds(ops: Network, box: Box, spec_C: Tensor, intermediate: Mapping[int, Box] | None = None,
                 alphas: Alphas | None = None, *, mode: str = "crown-ibp", split: Splits | None = None,
                 crown_layers: Collection[int] | None = None, unstable_only: bool = True,
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> Tensor:
    """Lower bounds of C f(x) over the box, shape (B, S); ``spec_C`` is (B, S, K) or (S, K).

    ``intermediate``: ReLU / max-pool input boxes (see ``intermediate_bounds``, computed with
    ``mode`` when None). ``alphas``: lower slopes per ReLU op index, each broadcastable to
    (B, S, *shape) (clamped to [0, 1]); missing ReLUs use the adaptive slope. ``split`` tightens
    the intermediate boxes. When the last op is Linear its backward rule multiplies the spec
    into the weights first (C W, C b): last-layer elision comes for free."""
    if intermediate is None:
        intermediate = intermediate_bounds(ops, box, mode, split=split, crown_layers=crown_layers,
                                           unstable_only=unstable_only, max_elements=max_elements)
    else:
        intermediate = apply_splits(intermediate, split)
    _check_intermediate(ops, intermediate)
    relaxations = relaxations_of(ops, intermediate, alphas)
    bound = backward(ops, _spec_bound(spec_C, box), tuple(box.lower.shape[1:]), relaxations)
    lower = concretize_lower(bound, box)
    return lower.expand(box.lower.shape[0], -1)


def crown_upper_bounds(ops: Network, box: Box, spec_C: Tensor,
                       intermediate: Mapping[int, Box] | None = None, alphas: Alphas | None = None,
                       **options) -> Tensor:
    """Upper bounds of C f(x): minus the lower bounds of -C f(x)."""
    return -crown_bounds(ops, box, -spec_C, intermediate, alphas, **options)


def _other_classes(labels: Tensor, num_classes: int) -> Tensor:
    """(B, K-1): the classes other than each sample's label, in increasing order."""
    classes = torch.arange(num_classes, device=labels.device).expand(labels.shape[0], -1)
    return classes[classes != labels.unsqueeze(1)].view(labels.shape[0], num_classes - 1)


def crown_margin_lower(ops: Network, box: Box, labels: Tensor, num_classes: int,
                       intermediate: Mapping[int, Box] | None = None, *, mode: str = "crown-ibp",
                       alpha_iterations: int = 0, **options) -> Tensor:
    """Lower bounds of the margins z_y - z_i, shape (B, K), entry y = 0 (as
    ``ibp.ibp_margin_lower``). The K - 1 rows e_y - e_i, i != y, are the spec (the zero row y
    is left out); when the last op is Linear its backward rule multiplies the spec into the
    weights first (C W, C b: last-layer elision). With ``alpha_iterations > 0`` the bounds are
    alpha-CROWN's (detached); ``options`` go to ``crown_bounds`` / ``alpha_crown``."""
    others = _other_classes(labels, num_classes)
    spec = margin_spec(labels, num_classes, dtype=box.lower.dtype).to(box.lower.device)
    spec = spec.gather(1, others.unsqueeze(-1).expand(-1, -1, num_classes))
    if alpha_iterations > 0:
        lower = alpha_crown(ops, box, spec, intermediate, alpha_iterations, mode=mode, **options).lower
    else:
        lower = crown_bounds(ops, box, spec, intermediate, mode=mode, **options)
    return torch.zeros(labels.shape[0], num_classes, dtype=lower.dtype, device=lower.device).scatter(1, others, lower)


def crown_ibp_margin_lower(ops: Network, box: Box, labels: Tensor, num_classes: int,
                           intermediate: Mapping[int, Box] | None = None) -> Tensor:
    """CROWN-IBP lower bounds of the margins z_y - z_i, shape (B, K), entry y = 0, like
    ``ibp.ibp_margin_lower``: IBP boxes for the ReLU inputs (or ``intermediate``), CROWN for the
    margins, with the spec multiplied into the last layer when it is Linear. Differentiable."""
    return crown_margin_lower(ops, box, labels, num_classes, intermediate, mode="crown-ibp")


# ----------------------------------------------------------------------------------------------
# alpha-CROWN


@dataclass(frozen=True, eq=False)
class AlphaCrownResult:
    """The best lower bound seen per spec row (B, S), the slopes that gave it (per ReLU op
    index; with shared slopes, the last iterate), the intermediate boxes used, and the summed
    bound at every iteration."""

    lower: Tensor
    alphas: dict[int, Tensor]
    intermediate: IntermediateBounds
    history: list[float]


def _detached(box: Box) -> Box:
    return Box(box.lower.detach(), box.upper.detach())


def alpha_crown(ops: Network, box: Box, spec_C: Tensor, intermediate: Mapping[int, Box] | None = None,
                iterations: int = 20, lr: float = 0.1, *, lr_decay: float = 0.98, shared_alpha: bool = False,
                init_alphas: Alphas | None = None, mode: str = "crown-ibp", split: Splits | None = None,
                crown_layers: Collection[int] | None = None, unstable_only: bool = True,
                max_elements: int = DEFAULT_MAX_ELEMENTS) -> AlphaCrownResult:
    """alpha-CROWN: maximize the sum of the CROWN lower bounds of C f(x) over the lower slopes
    alpha of the unstable ReLU neurons, by projected Adam (alpha clamped to [0, 1] after every
    step, learning rate multiplied by ``lr_decay`` each step).

    Slopes have shape (B, S, *shape) per ReLU (one per neuron and spec row), or (B, 1, *shape)
    with ``shared_alpha``; they start from ``init_alphas`` or the adaptive choice, so the first
    iterate is plain CROWN. Every alpha in [0, 1] is sound, hence so is the best bound seen per
    spec row, which is returned: never looser than CROWN with the initial slopes.

    The intermediate boxes are fixed (given, or computed once with ``mode``); optimizing
    intermediate-layer slopes as well (the full method of Xu et al.) is not implemented.
    The result is detached from the network's parameters."""
    if intermediate is None:
        with torch.no_grad():
            intermediate = intermediate_bounds(ops, box, mode, split=split, crown_layers=crown_layers,
                                               unstable_only=unstable_only, max_elements=max_elements)
    intermediate = {index: _detached(pre) for index, pre in apply_splits(intermediate, split).items()}
    _check_intermediate(ops, intermediate)
    box = _detached(box)
    spec = _spec_bound(spec_C.detach(), box).A
    rows = 1 if shared_alpha else spec.shape[1]
    init_alphas = init_alphas or {}
    alphas: dict[int, Tensor] = {}
    relus = set(relu_indices(ops))
    for index, pre in intermediate.items():
        if index not in relus:
            continue  # max pools have no slope to optimize
        start = init_alphas.get(index)
        start = adaptive_alpha(pre).unsqueeze(1) if start is None else start.detach().to(pre.lower)
        start = start.expand(pre.lower.shape[0], rows, *pre.lower.shape[1:]).clamp(0.0, 1.0)
        alphas[index] = start.clone().requires_grad_(True)
    parameters = list(alphas.values())
    optimizer = torch.optim.Adam(parameters, lr=lr) if parameters else None
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, lr_decay) if optimizer else None
    best: Tensor | None = None
    best_alphas: dict[int, Tensor] = {}
    history: list[float] = []
    steps = max(1, iterations)
    for step in range(steps):
        with torch.enable_grad():
            lower = crown_bounds(ops, box, spec, intermediate, alphas)
        current = lower.detach()
        history.append(float(current.sum()))
        if best is None:
            best = current.clone()
            best_alphas = {index: alpha.detach().clone() for index, alpha in alphas.items()}
        else:
            improved = current > best
            best = torch.where(improved, current, best)
            for index, alpha in alphas.items():
                if shared_alpha:
                    best_alphas[index] = alpha.detach().clone()
                else:
                    mask = improved.view(*improved.shape, *([1] * (alpha.dim() - 2)))
                    best_alphas[index] = torch.where(mask, alpha.detach(), best_alphas[index])
        if step == steps - 1 or optimizer is None or not lower.requires_grad:
            break
        gradients = torch.autograd.grad(-lower.sum(), parameters, allow_unused=True)
        for parameter, gradient in zip(parameters, gradients):
            parameter.grad = gradient if gradient is not None else torch.zeros_like(parameter)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for parameter in parameters:
                parameter.clamp_(0.0, 1.0)
    return AlphaCrownResult(best, best_alphas, intermediate, history)


def alpha_crown_bounds(ops: Network, box: Box, spec_C: Tensor, intermediate: Mapping[int, Box] | None = None,
                       iterations: int = 20, lr: float = 0.1, **options) -> Tensor:
    """The lower bounds (B, S) of ``alpha_crown``."""
    return alpha_crown(ops, box, spec_C, intermediate, iterations, lr, **options).lower
