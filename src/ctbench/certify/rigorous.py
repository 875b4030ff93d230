"""Rigorous bounds in floating point: interval arithmetic and CROWN with every rounding error
accounted for, so that a positive lower bound is a proof about the real-valued network.

**The network.** ``interval_network(model)`` (eval mode) reads every parameter exactly (float32
-> float64 is exact). Linear and Conv keep their weights and biases as points. BatchNorm (its
population statistics) and the input normalization become ``IntervalAffineOp``: per channel
y = s x + t, with intervals s and t that contain the real numbers gamma / sqrt(var + eps) and
beta - mean gamma / sqrt(var + eps) (resp. 1 / std and -mean / std), computed with outward
rounding; they are not folded into a neighbouring layer (a fold would round again). The
network certified is the exact real-valued function of these parameters (BatchNorm's eps is
the double ``layer.eps``). ``point_network(ops)`` reads lowered ops as they are (exact points).
The input box is rebuilt outward from the float input and eps (``rigorous_box``).

**Error model** (IEEE 754 binary64, round to nearest, gradual underflow; u = 2^-53,
eta = 2^-1074):

* a correctly rounded operation (+, -, *, /, sqrt) returns one of the two floats around the
  exact result, so ``next_down`` / ``next_up`` of it (torch.nextafter, one ulp) is a lower /
  upper bound of the exact result;
* a dot product, matrix product or convolution of n terms, in any summation order, with or
  without FMA:  |fl(sum a_i b_i) - sum a_i b_i| <= gamma_n sum |a_i||b_i| + n eta,
  gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms, 3.1);
  BLAS GEMM and im2col convolutions compute every entry as such a sum, and convolutions run
  with cuDNN disabled (no FFT or Winograd);
* error terms are computed in float too: ``inflate(v)`` bounds from above the exact value of a
  short expression (< 2^8 roundings) of + and * on nonnegative floats whose float value is v;
  ``dot_upper(v, n)`` bounds the exact sum of n nonnegative products whose float sum is v by
  (v + n eta)(1 + 2 gamma_n) >= (v + n eta) / (1 - gamma_n).

Gradual underflow is checked (``check_gradual_underflow``), since flush-to-zero
(``torch.set_flush_denormal(True)``) would void the eta terms.

**Bounds of every layer** (``layer_bounds``): bounds[k] is a Box that contains, for every input
x of the box satisfying the splits, the real network's value at the input of op k. Linear and
Conv map a box [c - r, c + r] (c a float, r rounded up) to  fl(W c + b) +- E  with
E >= |W| r + gamma_{n+1} (|W||c| + |b|) + (n+1) eta  (n: fan-in); an IntervalAffineOp takes
the four products of the interval ends rounded outward, then adds the shift outward; ReLU and
Flatten are exact. At a ReLU the box is intersected with rigorous CROWN bounds (chosen
layers), with given bounds valid on the whole box, and with the split half-spaces.

**CROWN** (``backward``, ``concretize``). The invariant carried from the output to the input
of op k is, in exact arithmetic,

    C f(x) >= A . h_k(x) + offset      for every x of the domain (box and splits),

where A is whatever float tensor was computed (any A is a legitimate choice) and offset a
float; every update of offset is rounded down. The steps:

* Linear / Conv (exact W, b): A' = fl(A W) (the adjoint conv for a Conv) differs from A W by at
  most gamma_m |A||W| + m eta (m: fan-out), so with M = max(|l|, |u|) of h_k,
  A W . h >= A' . h - gamma_m |A| . (|W| M) - m eta |M|_1,  and
  A . b >= fl(A . b) - gamma_n |A| . |b| - n eta  (n: elements of the output).
* IntervalAffineOp: with s_hat a float and s_rad >= |s - s_hat| for s in the interval,
  A' = fl(A s_hat) and |A' - A s| <= |A| (s_rad + u |s_hat|) + eta;
  A . t >= fl(A . t_hat) - |A| . t_rad - gamma_n |A| . |t_hat| - n eta.
* ReLU with rigorous bounds [l, u] of its input (stable or not is decided on them only):
  for A >= 0, A' = fl(A alpha) with alpha in [0, 1]; rounding is monotone, so A' = A alpha'
  with alpha' in [0, 1] exactly, and relu(h) >= alpha' h for every h. For A < 0: 0 if u <= 0,
  A if l >= 0, else A' = fl(A s~) with s~ two ulps above s = next_up(u / next_down(u - l))
  >= u / (u - l), so that A' <= A s + eta / 2; with relu(h) <= s (h - l) on [l, u],
  A relu(h) >= A' h - A' l - eta (u - l) / 2: offset -= an upper bound of the sum of
  A' l + eta (u - l) / 2 over those neurons.
* split multipliers (beta-CROWN, as ``bab.split_bound``): on the domain sgn_j h_j >= 0, and
  A' = fl(A - beta sgn) = A - beta' sgn exactly with beta' >= 0 (monotone rounding again), so
  A . h >= A' . h there: no slack.
* Flatten, Reshape, Add, Concat: A is reshaped, copied to both inputs, or split: no arithmetic.
* AvgPool: the window sum (a Conv whose weights 1 are exact) followed by an IntervalAffineOp
  with s in [next_down(1/n), next_up(1/n)] (n = kh kw) and t = 0: the two rules above.
* MaxPool (DeepPoly lines, ``bounds.crown``), chosen on the rigorous bounds of its input, so
  h_{i*} <= y and y <= h_{i*} (dominated) or y <= U = max_j u_j hold for the real values. The
  coefficients A+ + A- [dominated] are exact (one term is 0); moving them onto the input is a
  sum over the m = ceil(kh/sh) ceil(kw/sw) windows that may cover a position, so the float
  A' differs from the exact one by at most gamma_m sum |coefficients| (nothing when m = 1):
  offset -= sum of that times M. The constant sum A- U over the other windows is rounded down
  like a dot product: fl(sum) - gamma_n sum |A-||U| - n eta.
* input: for x in [c - r, c + r],  A . x >= fl(A . c) - (|A| . r + gamma_n |A| . |c| + n eta).

On a DAG the same rules run node by node in reverse topological order, each node's A the sum
of what its readers pass back: a float sum T = fl(A_1 + A_2) = (A_1 + A_2)(1 + d), |d| <= u
(exact on underflow), so |T - (A_1 + A_2)| <= 2u |T| and offset -= 2u |T| . M per addition (M:
the magnitude of the node's output, from the box its readers see). IBP: Add is
[next_down(l_a + l_b), next_up(u_a + u_b)]; max pooling, concatenation and reshapes are exact.
For an op of several inputs, ``layer_bounds`` holds the tuple of its input boxes.

The result is a float <= the exact minimum of the network, hence <= min of C f(x) over the
domain. Overflow can only make it -inf or NaN; NaN is returned as -inf.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bounds.box import Box
from ..bounds.crown import (
    BACKWARD_RULES, SHAPE_RULES, SPLIT_RULES, BackwardContext, LinearBound, adaptive_alpha, apply_split, fold_windows,
    ibp_is_exact, maxpool_relaxation, output_shapes, walk_backward,
)
from ..models.layers import Normalize
from ..models.ops import (
    BATCHNORM_TYPES, INPUT, LOWERINGS, NARY_OPS, AddOp, AvgPoolOp, ChannelAffineOp, ConcatOp, ConvOp, FlattenOp,
    LayerNode, LinearOp, MaxPoolOp, Network, Op, ReluOp, ReshapeOp, as_graph, assemble, layer_nodes, network_ops,
    node_inputs, with_ops,
)

UNIT_ROUNDOFF = 2.0 ** -53
ETA = 2.0 ** -1074  # the smallest subnormal: absolute error of an underflowing product
INFLATION = 1.0 + 2.0 ** -44
TINY = 2.0 ** -1000
DEFAULT_MAX_ELEMENTS = 2 ** 25


@dataclass(frozen=True, eq=False)
class IntervalAffineOp:
    """y = s x + t per channel (dim 1) for some s in ``scale`` and t in ``shift`` (Boxes of
    shape (C,)): BatchNorm with fixed statistics, Normalize."""

    scale: Box
    shift: Box


SHAPE_RULES[IntervalAffineOp] = SHAPE_RULES[ChannelAffineOp]  # per channel: the shape stays

RigorousOp = (LinearOp | ConvOp | IntervalAffineOp | ReluOp | FlattenOp | ReshapeOp | AvgPoolOp | MaxPoolOp | AddOp
              | ConcatOp)


# ----------------------------------------------------------------------------------------------
# Rounding


def next_down(tensor: Tensor) -> Tensor:
    return torch.nextafter(tensor, tensor.new_tensor(-math.inf))


def next_up(tensor: Tensor) -> Tensor:
    return torch.nextafter(tensor, tensor.new_tensor(math.inf))


def gamma(n: int) -> float:
    """An upper bound of gamma_n = n u / (1 - n u) = n / (2^53 - n)."""
    return math.nextafter(float(Fraction(n, 2 ** 53 - n)), math.inf)


def inflate(value: Tensor) -> Tensor:
    """An upper bound of the exact value of a short expression of + and * on nonnegative floats
    whose float evaluation is ``value`` (fewer than 2^8 roundings, each a factor 1 + u or, on
    underflow, an absolute eta / 2 not multiplied by more than 2 afterwards):
    value (1 + 2^-44) + 2^-1000, then one ulp up."""
    return next_up(value * INFLATION + TINY)


def dot_upper(value: Tensor, n: int) -> Tensor:
    """The exact sum of n nonnegative products whose float sum is ``value`` is at most
    (value + n eta)(1 + 2 gamma_n)."""
    return inflate((value + n * ETA) * (1.0 + 2.0 * gamma(n)))


def check_gradual_underflow(device: torch.device | str) -> None:
    """Raise unless float64 arithmetic on ``device`` keeps subnormal numbers (the eta terms)."""
    smallest_normal = torch.tensor([2.0 ** -1022], dtype=torch.float64, device=device)
    if float((smallest_normal / 2 * 1.0)[0]) != 2.0 ** -1023:
        raise ArithmeticError("float64 subnormals are flushed to zero (torch.set_flush_denormal?); "
                              "rigorous bounds assume gradual underflow")


def interval_times(interval: Box, factor: Tensor) -> Box:
    """{a * f : a in interval} for a point f, elementwise, rounded outward."""
    first, second = interval.lower * factor, interval.upper * factor
    return Box(next_down(torch.minimum(first, second)), next_up(torch.maximum(first, second)))


# ----------------------------------------------------------------------------------------------
# The network


def _exact64(op: Op) -> Op:
    """A Linear/Conv op with its weight and bias read exactly in float64."""
    bias = None if op.bias is None else op.bias.detach().double()
    return replace(op, weight=op.weight.detach().double(), bias=bias)


def _batchnorm_interval(layer: nn.modules.batchnorm._BatchNorm) -> IntervalAffineOp:
    """s = gamma / sqrt(var + eps), t = beta - mean s, as intervals (population statistics)."""
    if layer.running_mean is None:
        raise ValueError(f"{layer} tracks no running statistics")
    mean, var = layer.running_mean.detach().double(), layer.running_var.detach().double()
    weight = layer.weight.detach().double() if layer.affine else torch.ones_like(mean)
    bias = layer.bias.detach().double() if layer.affine else torch.zeros_like(mean)
    variance = var + layer.eps
    root = Box(next_down(torch.sqrt(next_down(variance))), next_up(torch.sqrt(next_up(variance))))
    inverse = Box(next_down(1.0 / root.upper), next_up(1.0 / root.lower))
    scale = interval_times(inverse, weight)
    centered = interval_times(scale, mean)
    return IntervalAffineOp(scale, Box(next_down(bias - centered.upper), next_up(bias - centered.lower)))


def _normalize_interval(layer: Normalize) -> IntervalAffineOp:
    """s = 1 / std, t = -mean / std, as intervals."""
    std, mean = layer.std.detach().double().flatten(), layer.mean.detach().double().flatten()
    scale = Box(next_down(1.0 / std), next_up(1.0 / std))
    centered = interval_times(scale, mean)
    return IntervalAffineOp(scale, Box(-centered.upper, -centered.lower))


def _rigorous_layer(layer: LayerNode) -> RigorousOp | None:
    """A layer of the model as a rigorous op (None: an identity)."""
    module = layer.module
    if module is None:
        return layer.op
    if isinstance(module, BATCHNORM_TYPES):
        return _batchnorm_interval(module)
    if isinstance(module, Normalize):
        return _normalize_interval(module)
    op = LOWERINGS[type(module)](module, None, True)
    return _exact64(op) if isinstance(op, (LinearOp, ConvOp)) else op


def interval_network(model: nn.Module) -> Network:
    """The model (eval semantics) as rigorous ops, a chain or a DAG as ``lower_network`` gives
    it, node for node (module docstring)."""
    return _checked(assemble(layer_nodes(model), _rigorous_layer))


def _point_op(op: Op) -> RigorousOp:
    if isinstance(op, ChannelAffineOp):
        scale, shift = op.scale.detach().double(), op.shift.detach().double()
        return IntervalAffineOp(Box(scale, scale), Box(shift, shift))
    return _exact64(op) if isinstance(op, (LinearOp, ConvOp)) else op


def point_network(ops: Network) -> Network:
    """Lowered ops read as exact points: the network certified is the one their values define
    (for BatchNorm and Normalize a float fold of the model's, which ``interval_network`` avoids)."""
    return _checked(with_ops(ops, [_point_op(op) for op in network_ops(ops)]))


def _checked(net: Network) -> Network:
    """The network, after checking gradual underflow on the device of its weights."""
    check_gradual_underflow(next(op.weight.device for op in network_ops(net) if isinstance(op, (LinearOp, ConvOp))))
    return net


def rigorous_box(x: Tensor, eps: float, data_range: tuple[float, float]) -> Box:
    """[next_down(x - eps'), next_up(x + eps')] clamped to the data range, eps' = next_up(eps):
    contains every real point within the real eps the user meant (0.1, 8/255) of x."""
    x64 = x.detach().double()
    radius = math.nextafter(float(eps), math.inf)
    lo, hi = data_range
    return Box(next_down(x64 - radius).clamp(min=lo), next_up(x64 + radius).clamp(max=hi))


# ----------------------------------------------------------------------------------------------
# Affine maps as sums of products


def _no_cudnn():
    """Convolutions as im2col + GEMM, whose outputs are plain sums of products."""
    return torch.backends.cudnn.flags(enabled=False)


def _apply(op: LinearOp | ConvOp, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if isinstance(op, LinearOp):
        return F.linear(x, weight, bias)
    with _no_cudnn():
        return F.conv2d(x, weight, bias, op.stride, op.padding)


def _fan_in(op: LinearOp | ConvOp) -> int:
    return op.weight[0].numel()


def _fan_out(op: LinearOp | ConvOp) -> int:
    """Terms of one entry of the adjoint product A W: out features, or C_out kh kw."""
    return op.weight.shape[0] * op.weight[0, 0].numel()


def _bias_abs(op: LinearOp | ConvOp, like: Tensor) -> Tensor:
    if op.bias is None:
        return torch.zeros_like(like)
    bias = op.bias.abs()
    return bias if isinstance(op, LinearOp) else bias.view(-1, 1, 1)


def _center_radius(box: Box) -> tuple[Tensor, Tensor]:
    """A float center c and a radius r with [c - r, c + r] containing the box."""
    center = (box.lower + box.upper) * 0.5
    return center, next_up(torch.maximum(box.upper - center, center - box.lower))


def _magnitude(box: Box) -> Tensor:
    """max(|l|, |u|): a bound of |h| on the box (exact)."""
    return torch.maximum(box.lower.abs(), box.upper.abs())


def _abs_dot(A: Tensor, weights: Tensor) -> Tensor:
    """fl(|A| . w): A (B or 1, S, *shape), w (B, *shape) -> (B, S)."""
    return A.abs().flatten(2).matmul(weights.flatten(1).unsqueeze(-1)).squeeze(-1)


def _dot(A: Tensor, values: Tensor) -> Tensor:
    """fl(A . v): A (B or 1, S, *shape), v (B, *shape) -> (B, S)."""
    return A.flatten(2).matmul(values.flatten(1).unsqueeze(-1)).squeeze(-1)


def _l1_upper(magnitude: Tensor) -> Tensor:
    """An upper bound of |M|_1 per sample, shape (B, 1)."""
    return dot_upper(magnitude.flatten(1).sum(1), magnitude[0].numel()).unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Bounds of every layer


def _ibp_affine(op: LinearOp | ConvOp, box: Box) -> Box:
    """fl(W c + b) +- E, E >= |W| r + gamma_{n+1} (|W||c| + |b|) + (n+1) eta."""
    center, radius = _center_radius(box)
    n = _fan_in(op)
    value = _apply(op, center, op.weight, op.bias)
    weight_abs = op.weight.abs()
    spread = dot_upper(_apply(op, radius, weight_abs), n)
    size = dot_upper(_apply(op, center.abs(), weight_abs), n)
    error = inflate(spread + gamma(n + 1) * (size + _bias_abs(op, size)) + (n + 1) * ETA)
    return Box(next_down(value - error), next_up(value + error))


def _channel(tensor: Tensor, ndim: int) -> Tensor:
    return tensor.view(1, -1, *([1] * (ndim - 2)))


def _ibp_interval_affine(op: IntervalAffineOp, box: Box) -> Box:
    """The four products of the interval ends, rounded outward, plus the shift outward."""
    ndim = box.lower.dim()
    scale_lower, scale_upper = _channel(op.scale.lower, ndim), _channel(op.scale.upper, ndim)
    products = torch.stack([scale_lower * box.lower, scale_lower * box.upper,
                            scale_upper * box.lower, scale_upper * box.upper])
    lower = next_down(products.amin(0)) + _channel(op.shift.lower, ndim)
    upper = next_up(products.amax(0)) + _channel(op.shift.upper, ndim)
    return Box(next_down(lower), next_up(upper))


def _sum_pool(op: AvgPoolOp, like: Tensor) -> ConvOp:
    """The window sums of an average pooling of ``like`` (B, C, H, W): a Conv from each channel
    to itself with weights 1 (exact)."""
    channels = like.shape[1]
    eye = torch.eye(channels, dtype=like.dtype, device=like.device)
    return ConvOp(eye[:, :, None, None].expand(-1, -1, *op.kernel).contiguous(), None, op.stride, op.padding)


def _pool_scale(op: AvgPoolOp, like: Tensor) -> IntervalAffineOp:
    """y = s x with s in [next_down(1/n), next_up(1/n)] per channel, n = kh kw (t = 0)."""
    inverse = torch.full((like.shape[1],), 1.0 / math.prod(op.kernel), dtype=like.dtype, device=like.device)
    zero = torch.zeros_like(inverse)
    return IntervalAffineOp(Box(next_down(inverse), next_up(inverse)), Box(zero, zero))


def _ibp_avg_pool(op: AvgPoolOp, box: Box) -> Box:
    return _ibp_interval_affine(_pool_scale(op, box.lower), _ibp_affine(_sum_pool(op, box.lower), box))


def _ibp_add(op: AddOp, boxes: tuple[Box, Box]) -> Box:
    first, second = boxes
    return Box(next_down(first.lower + second.lower), next_up(first.upper + second.upper))


def _ibp_exact(op: Op, box: Box | tuple[Box, ...]) -> Box:
    """Ops that compute no new number (ReLU, max pooling, reshapes, concatenation): the op
    applied to both ends."""
    if isinstance(op, NARY_OPS):
        return Box(op(*(b.lower for b in box)), op(*(b.upper for b in box)))
    return Box(op(box.lower), op(box.upper))


# Rigorous IBP rules: (op, box or tuple of boxes for an op of several inputs) -> a rigorous box.
RIGOROUS_IBP_RULES = {
    LinearOp: _ibp_affine,
    ConvOp: _ibp_affine,
    IntervalAffineOp: _ibp_interval_affine,
    AvgPoolOp: _ibp_avg_pool,
    AddOp: _ibp_add,  # n-ary rules take the tuple of their input boxes
    ReluOp: _ibp_exact,
    MaxPoolOp: _ibp_exact,
    FlattenOp: _ibp_exact,
    ReshapeOp: _ibp_exact,
    ConcatOp: _ibp_exact,
}


def ibp_node(op: RigorousOp, boxes: Sequence[Box]) -> Box:
    """A rigorous box of a node's output from rigorous boxes of its inputs."""
    return RIGOROUS_IBP_RULES[type(op)](op, tuple(boxes) if isinstance(op, NARY_OPS) else boxes[0])


def _intersect(box: Box, other: Box) -> Box:
    return Box(torch.maximum(box.lower, other.lower), torch.minimum(box.upper, other.upper))


def _without_nan(box: Box) -> Box:
    """NaN (from inf - inf) means nothing is known: lower -inf, upper +inf."""
    return Box(box.lower.nan_to_num(-math.inf, math.inf, -math.inf),
               box.upper.nan_to_num(math.inf, math.inf, -math.inf))


def layer_bounds(net: Network, box: Box, *, crown_layers: Collection[int] = (),
                 split: Mapping[int, Tensor] | None = None, given: Mapping[int, Box] | None = None,
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> list[Box | tuple[Box, ...]]:
    """bounds[k]: a rigorous box of the input of node k (the tuple of its input boxes for an add or
    a concatenation; bounds[0] holds ``box``). At a ReLU or max pool the IBP box is intersected
    with rigorous CROWN bounds (node indices in ``crown_layers``, unless IBP is exact there),
    with ``given[k]`` (bounds valid on the whole box, batch dims broadcast) and with the split
    half-spaces (``split[k]`` in {-1, 0, +1}); the intersection replaces the box of the node it
    bounds for every reader."""
    split, given = split or {}, given or {}
    graph = as_graph(net)
    bounds: list[Box | tuple[Box, ...]] = []
    outputs: list[Box] = []
    for index, node in enumerate(graph.nodes):
        inputs = node_inputs(outputs, box, node)
        if isinstance(node.op, (ReluOp, MaxPoolOp)):
            source, current = node.inputs[0], inputs[0]
            if index in crown_layers and source != INPUT and not ibp_is_exact(graph.prefix(source + 1)):
                current = _crown_preactivation(graph.prefix(source + 1), bounds[:source + 1], current, max_elements)
            if index in given:
                current = _intersect(current, given[index])
            inputs = [apply_split(current, split.get(index))]
            if source != INPUT:
                outputs[source] = inputs[0]
        bounds.append(tuple(inputs) if isinstance(node.op, NARY_OPS) else inputs[0])
        outputs.append(_without_nan(ibp_node(node.op, inputs)))
    return bounds


def _crown_preactivation(net: Network, bounds: list[Box], pre: Box, max_elements: int) -> Box:
    """``pre`` intersected with rigorous CROWN bounds (rows +e_j and -e_j, in chunks) of its
    neurons that are unstable in some sample; earlier ReLUs take the adaptive slopes."""
    batch, shape = pre.lower.shape[0], tuple(pre.lower.shape[1:])
    lower, upper = pre.lower.flatten(1).clone(), pre.upper.flatten(1).clone()
    chosen = ((lower < 0) & (upper > 0)).any(dim=0).nonzero().squeeze(1)
    if chosen.numel() == 0:
        return pre
    widest = max(b.lower[0].numel() for b in [*_boxes(bounds), pre])
    for chunk in chosen.split(max(1, max_elements // (2 * batch * widest))):
        count = chunk.numel()
        eye = torch.zeros(count, lower.shape[1], dtype=lower.dtype, device=lower.device)
        eye[torch.arange(count, device=chunk.device), chunk] = 1.0
        rows = crown_lower(net, bounds, torch.cat([eye, -eye]).reshape(1, 2 * count, *shape))
        lower[:, chunk] = torch.maximum(lower[:, chunk], rows[:, :count])
        upper[:, chunk] = torch.minimum(upper[:, chunk], -rows[:, count:])
    return Box(lower.view(batch, *shape), upper.view(batch, *shape))


# ----------------------------------------------------------------------------------------------
# Back-substitution


def _backward_affine(op: LinearOp | ConvOp, A: Tensor, offset: Tensor, pre: Box) -> tuple[Tensor, Tensor]:
    """A' = fl(A W), offset + fl(A . b) - gamma_m |A| . (|W| M) - m eta |M|_1 - gamma_n |A| . |b| - n eta."""
    with _no_cudnn():
        moved = BACKWARD_RULES[type(op)](op, LinearBound(A, torch.zeros_like(offset)),
                                         BackwardContext(tuple(pre.lower.shape[1:])))
    magnitude = _magnitude(pre)
    n_out, fan_out = math.prod(A.shape[2:]), _fan_out(op)
    reach = dot_upper(_apply(op, magnitude, op.weight.abs()), _fan_in(op))  # >= |W| M
    weights = inflate(gamma(fan_out) * reach + gamma(n_out) * _bias_abs(op, reach))
    slack = inflate(dot_upper(_abs_dot(A, weights), n_out) + fan_out * ETA * _l1_upper(magnitude) + n_out * ETA)
    return moved.A, next_down(next_down(offset + moved.bias) - slack)


def _backward_interval_affine(op: IntervalAffineOp, A: Tensor, offset: Tensor, pre: Box) -> tuple[Tensor, Tensor]:
    """A' = fl(A s_hat), offset + fl(A . t_hat) - |A| . ((s_rad + u |s_hat|) M + gamma_n |t_hat|
    + t_rad) - eta |M|_1 - n eta."""
    scale, scale_radius = _center_radius(op.scale)
    shift, shift_radius = _center_radius(op.shift)
    moved = BACKWARD_RULES[ChannelAffineOp](ChannelAffineOp(scale, shift), LinearBound(A, torch.zeros_like(offset)),
                                            BackwardContext(tuple(pre.lower.shape[1:])))
    magnitude, ndim, n = _magnitude(pre), pre.lower.dim(), math.prod(A.shape[2:])
    per_scale = inflate(_channel(scale_radius, ndim) + UNIT_ROUNDOFF * _channel(scale.abs(), ndim))
    weights = inflate(per_scale * magnitude + gamma(n) * _channel(shift.abs(), ndim) + _channel(shift_radius, ndim))
    slack = inflate(dot_upper(_abs_dot(A, weights), n) + ETA * _l1_upper(magnitude) + n * ETA)
    return moved.A, next_down(next_down(offset + moved.bias) - slack)


def _upper_slope(pre: Box) -> Tensor:
    """Per neuron: 0 inactive, 1 active, and for an unstable one s~ = next_up(next_up(s)) with
    s = next_up(u / next_down(u - l)) >= u / (u - l), so that fl(A s~) <= A s + eta / 2 for A < 0."""
    unstable = (pre.lower < 0) & (pre.upper > 0)
    width = torch.where(unstable, next_down(pre.upper - pre.lower), torch.ones_like(pre.upper))
    chord = next_up(next_up(next_up(pre.upper / width)))
    return torch.where(unstable, chord, (pre.lower >= 0).to(pre.lower.dtype))


def _backward_relu(A: Tensor, offset: Tensor, pre: Box, alpha: Tensor | None) -> tuple[Tensor, Tensor]:
    """A' = fl(A+ alpha) + fl(A- s~) (module docstring): for an unstable neuron with A < 0,
    A' <= A s + eta / 2, so A relu(h) >= A' (h - l) - eta (u - l) / 2 on [l, u]; offset -= an
    upper bound of sum A' l + eta (u - l) / 2 over the unstable neurons."""
    lower, upper = pre.lower.unsqueeze(1), pre.upper.unsqueeze(1)
    active, unstable = lower >= 0, (lower < 0) & (upper > 0)
    alpha = adaptive_alpha(pre).unsqueeze(1) if alpha is None else alpha.to(A).clamp(0.0, 1.0)
    negative = A.clamp(max=0) * _upper_slope(pre).unsqueeze(1)
    n = math.prod(A.shape[2:])
    intercepts = dot_upper(_dot(negative, pre.lower.clamp(max=0)), n)  # sum of A' l >= 0 (l < 0 unstable only)
    widths = torch.where(unstable[:, 0], next_up(pre.upper - pre.lower), torch.zeros_like(pre.upper))
    slack = inflate(intercepts + ETA * dot_upper(widths.flatten(1).sum(1), n).unsqueeze(1))
    A_in = A.clamp(min=0) * torch.where(unstable, alpha, active.to(A.dtype)) + negative
    return A_in, next_down(offset - slack)


def _backward_avg_pool(op: AvgPoolOp, A: Tensor, offset: Tensor, pre: Box) -> tuple[Tensor, Tensor]:
    """The window sum (exact weights) after the scale interval [next_down(1/n), next_up(1/n)]."""
    window_sum = _sum_pool(op, pre.lower)
    A, offset = _backward_interval_affine(_pool_scale(op, pre.lower), A, offset,
                                          _without_nan(_ibp_affine(window_sum, pre)))
    return _backward_affine(window_sum, A, offset, pre)


def _window_overlap(op: MaxPoolOp) -> int:
    """The most windows that cover one input position: ceil(kh/sh) ceil(kw/sw)."""
    return math.prod(-(-kernel // stride) for kernel, stride in zip(op.kernel, op.stride))


def _backward_max_pool(op: MaxPoolOp, A: Tensor, offset: Tensor, pre: Box) -> tuple[Tensor, Tensor]:
    """The DeepPoly lines chosen on the rigorous bounds ``pre`` (module docstring): exact
    coefficients, the rounding of their sum over overlapping windows (gamma_m sum |c| M), and
    the constant sum A- U over the windows without a dominating input, rounded down."""
    relax = maxpool_relaxation(op, pre)
    shape = tuple(pre.lower.shape[1:])
    negative = A.clamp(max=0)
    windows = (A.clamp(min=0) + negative * relax.dominated).flatten(3).unsqueeze(3) * relax.choice
    A_in = fold_windows(op, windows, shape)
    overlap, n_in = _window_overlap(op), math.prod(shape)
    slack = torch.zeros_like(offset)
    if overlap > 1:
        error = inflate(gamma(overlap) * dot_upper(fold_windows(op, windows.abs(), shape), overlap))
        slack = dot_upper(_abs_dot(error, _magnitude(pre)), n_in)
    used = (negative < 0) & (relax.dominated == 0)
    products = torch.where(used, negative * relax.upper, torch.zeros_like(negative))
    magnitudes = torch.where(used, negative.abs() * relax.upper.abs(), torch.zeros_like(negative))
    n_out = math.prod(A.shape[2:])
    constant_error = inflate(gamma(n_out) * dot_upper(magnitudes.flatten(2).sum(-1), n_out) + n_out * ETA)
    constant = next_down(products.flatten(2).sum(-1) - constant_error)
    return A_in, next_down(next_down(offset + constant) - slack)


def _backward_reshape(op: FlattenOp | ReshapeOp, A: Tensor, offset: Tensor, pre: Box) -> tuple[Tensor, Tensor]:
    return A.reshape(A.shape[0], A.shape[1], *pre.lower.shape[1:]), offset


# Rigorous backward rules of the ops of one input: (op, A, offset, pre, alpha) -> (A', offset').
RIGOROUS_BACKWARD_RULES = {
    LinearOp: lambda op, A, offset, pre, alpha: _backward_affine(op, A, offset, pre),
    ConvOp: lambda op, A, offset, pre, alpha: _backward_affine(op, A, offset, pre),
    IntervalAffineOp: lambda op, A, offset, pre, alpha: _backward_interval_affine(op, A, offset, pre),
    ReluOp: lambda op, A, offset, pre, alpha: _backward_relu(A, offset, pre, alpha),
    AvgPoolOp: lambda op, A, offset, pre, alpha: _backward_avg_pool(op, A, offset, pre),
    MaxPoolOp: lambda op, A, offset, pre, alpha: _backward_max_pool(op, A, offset, pre),
    FlattenOp: lambda op, A, offset, pre, alpha: _backward_reshape(op, A, offset, pre),
    ReshapeOp: lambda op, A, offset, pre, alpha: _backward_reshape(op, A, offset, pre),
}


def _price_splits(A: Tensor, beta: Tensor, sign: Tensor) -> Tensor:
    """fl(A - beta sgn) = A - beta' sgn with beta' >= 0 exactly (monotone rounding)."""
    return A - beta.to(A).clamp(min=0) * sign.to(A).unsqueeze(1)


def backward(net: Network, bounds: Sequence[Box], A: Tensor, alphas: Mapping[int, Tensor] | None = None,
             betas: Mapping[int, Tensor] | None = None, split: Mapping[int, Tensor] | None = None,
             ) -> tuple[Tensor, Tensor]:
    """Move  C f(x) >= A . h_out(x)  (A (B or 1, S, *output shape)) from the output of ``net``
    (a prefix of the network: alphas, betas and split keyed by node index) to its input:
    returns (A_in, offset) with  C f(x) >= A_in . x + offset  on the domain, exactly.
    ``bounds[k]``: rigorous box of the (first) input of node k; ``alphas``: lower slopes, each
    broadcastable to (B, S, *shape), clamped to [0, 1] (adaptive where missing); ``betas``
    (clamped >= 0) price the split constraints ``split`` as ``bab.split_bound`` does."""
    alphas, betas = alphas or {}, betas or {}
    graph = as_graph(net)
    input_shape = tuple(_network_input(bounds).lower.shape[1:]) if bounds else tuple(A.shape[2:])
    shapes = output_shapes(graph, input_shape) if any(isinstance(op, NARY_OPS) for op in graph.ops) else []
    seen = _read_boxes(graph, bounds)
    offset = torch.zeros(A.shape[:2], dtype=A.dtype, device=A.device)

    def add(source: int, total: Tensor, part: Tensor) -> Tensor:
        nonlocal offset
        total = total + part
        offset = _sum_slack(total, offset, seen[source])
        return total

    def move(index: int, node_A: Tensor) -> list[tuple[int, Tensor]]:
        nonlocal offset
        node = graph.nodes[index]
        if isinstance(node.op, NARY_OPS):
            inputs = tuple(input_shape if source == INPUT else shapes[source] for source in node.inputs)
            context = BackwardContext(inputs[0], None, inputs)
            return list(zip(node.inputs, SPLIT_RULES[type(node.op)](node.op, node_A, context)))
        rule = RIGOROUS_BACKWARD_RULES[type(node.op)]
        node_A, offset = rule(node.op, node_A, offset, bounds[index], alphas.get(index))
        if index in betas:
            node_A = _price_splits(node_A, betas[index], split[index])
        return [(node.inputs[0], node_A)]

    input_A = walk_backward(graph, A, move, add)
    if input_A is None:
        input_A = A.new_zeros(1, A.shape[1], *input_shape)
    return input_A, offset


def _boxes(bounds: Sequence[Box | tuple[Box, ...]]) -> list[Box]:
    return [box for entry in bounds for box in (entry if isinstance(entry, tuple) else (entry,))]


def _network_input(bounds: Sequence[Box | tuple[Box, ...]]) -> Box:
    """The input box: node 0 reads only the input."""
    return bounds[0][0] if isinstance(bounds[0], tuple) else bounds[0]


def _read_boxes(graph, bounds: Sequence[Box | tuple[Box, ...]]) -> dict[int, Box]:
    """The box of every node's output (and of the input) as its readers see it."""
    seen: dict[int, Box] = {}
    for node, entry in zip(graph.nodes, bounds):
        for source, box in zip(node.inputs, entry if isinstance(entry, tuple) else (entry,)):
            seen[source] = box
    return seen


def _sum_slack(total: Tensor, offset: Tensor, box: Box) -> Tensor:
    """offset - 2u |T| . M, rounded down, for T = fl(A_1 + A_2) (module docstring)."""
    slack = inflate(2 * UNIT_ROUNDOFF * dot_upper(_abs_dot(total, _magnitude(box)), math.prod(total.shape[2:])))
    return next_down(offset - slack)


def concretize(A: Tensor, offset: Tensor, box: Box) -> Tensor:
    """A rigorous lower bound (B, S) of min over the box of A . x + offset:
    fl(A . c) - (|A| . (r + gamma_n |c|) + n eta) + offset, rounded down; NaN -> -inf."""
    center, radius = _center_radius(box)
    n = center[0].numel()
    width = inflate(radius + gamma(n) * center.abs())
    error = inflate(dot_upper(_abs_dot(A, width), n) + n * ETA)
    lower = next_down(next_down(_dot(A, center) - error) + offset)
    return lower.nan_to_num(-math.inf, math.inf, -math.inf)


def crown_lower(net: Network, bounds: Sequence[Box], spec: Tensor,
                alphas: Mapping[int, Tensor] | None = None, betas: Mapping[int, Tensor] | None = None,
                split: Mapping[int, Tensor] | None = None) -> Tensor:
    """Rigorous CROWN lower bounds (B, S) of the spec rows (B or 1, S, *output shape) over the
    domain: ``backward`` then ``concretize`` over the input box (bounds[0])."""
    A, offset = backward(net, bounds, spec.double(), alphas, betas, split)
    return concretize(A, offset, _network_input(bounds))


def ibp_lower(net: Network, bounds: Sequence[Box], spec: Tensor) -> Tensor:
    """Rigorous IBP lower bounds (B, S) of the spec rows, like ``ibp.ibp_margin_lower``: the
    rows multiplied into a last Linear op (last-layer elision), else over the logits' box."""
    last = network_ops(net)[-1]
    if isinstance(last, LinearOp):
        return crown_lower((last,), bounds[-1:], spec)
    logits = ibp_node(last, bounds[-1] if isinstance(last, NARY_OPS) else [bounds[-1]])
    return concretize(spec.double(), torch.zeros(spec.shape[:2], dtype=torch.float64, device=spec.device), logits)
