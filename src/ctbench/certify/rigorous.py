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
* input: for x in [c - r, c + r],  A . x >= fl(A . c) - (|A| . r + gamma_n |A| . |c| + n eta).

The result is a float <= the exact minimum of the chain, hence <= min of C f(x) over the
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
from ..bounds.crown import BACKWARD_RULES, BackwardContext, LinearBound, adaptive_alpha, apply_split, ibp_is_exact
from ..models.layers import Normalize
from ..models.ops import BATCHNORM_TYPES, LOWERINGS, ChannelAffineOp, ConvOp, FlattenOp, LinearOp, Op, ReluOp

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


RigorousOp = LinearOp | ConvOp | IntervalAffineOp | ReluOp | FlattenOp


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


def interval_network(model: nn.Module) -> tuple[RigorousOp, ...]:
    """The model (an nn.Sequential, eval semantics) as rigorous ops (module docstring)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"ctbench works on nn.Sequential models, got {type(model).__name__}")
    net: list[RigorousOp] = []
    for layer in model:
        if isinstance(layer, BATCHNORM_TYPES):
            net.append(_batchnorm_interval(layer))
        elif isinstance(layer, Normalize):
            net.append(_normalize_interval(layer))
        elif type(layer) in LOWERINGS:
            op = LOWERINGS[type(layer)](layer, None, True)
            if op is not None:
                net.append(_exact64(op) if isinstance(op, (LinearOp, ConvOp)) else op)
        else:
            raise TypeError(f"layer {type(layer).__name__} has no lowering")
    return _checked(net)


def point_network(ops: Sequence[Op]) -> tuple[RigorousOp, ...]:
    """Lowered ops read as exact points: the network certified is the one their values define
    (for BatchNorm and Normalize a float fold of the model's, which ``interval_network`` avoids)."""
    net: list[RigorousOp] = []
    for op in ops:
        if isinstance(op, ChannelAffineOp):
            scale, shift = op.scale.detach().double(), op.shift.detach().double()
            net.append(IntervalAffineOp(Box(scale, scale), Box(shift, shift)))
        else:
            net.append(_exact64(op) if isinstance(op, (LinearOp, ConvOp)) else op)
    return _checked(net)


def _checked(net: list[RigorousOp]) -> tuple[RigorousOp, ...]:
    """The network, after checking gradual underflow on the device of its weights."""
    check_gradual_underflow(next(op.weight.device for op in net if isinstance(op, (LinearOp, ConvOp))))
    return tuple(net)


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


def ibp_step(op: RigorousOp, box: Box) -> Box:
    """A rigorous box of op(h) for every real h in ``box``."""
    if isinstance(op, (LinearOp, ConvOp)):
        return _ibp_affine(op, box)
    if isinstance(op, IntervalAffineOp):
        return _ibp_interval_affine(op, box)
    if isinstance(op, ReluOp):
        return Box(box.lower.clamp(min=0), box.upper.clamp(min=0))
    return Box(box.lower.flatten(1), box.upper.flatten(1))


def _intersect(box: Box, other: Box) -> Box:
    return Box(torch.maximum(box.lower, other.lower), torch.minimum(box.upper, other.upper))


def _without_nan(box: Box) -> Box:
    """NaN (from inf - inf) means nothing is known: lower -inf, upper +inf."""
    return Box(box.lower.nan_to_num(-math.inf, math.inf, -math.inf),
               box.upper.nan_to_num(math.inf, math.inf, -math.inf))


def layer_bounds(net: Sequence[RigorousOp], box: Box, *, crown_layers: Collection[int] = (),
                 split: Mapping[int, Tensor] | None = None, given: Mapping[int, Box] | None = None,
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> list[Box]:
    """bounds[k]: a rigorous box of the input of net[k] (bounds[0] = ``box``). At a ReLU the IBP
    box is intersected with rigorous CROWN bounds (ReLU op indices in ``crown_layers``, unless
    IBP is exact there), with ``given[k]`` (bounds valid on the whole box, batch dims
    broadcast) and with the split half-spaces (``split[k]`` in {-1, 0, +1})."""
    split, given = split or {}, given or {}
    bounds: list[Box] = []
    current = box
    for index, op in enumerate(net):
        if isinstance(op, ReluOp):
            if index in crown_layers and not ibp_is_exact(net[:index]):
                current = _crown_preactivation(net[:index], bounds, current, max_elements)
            if index in given:
                current = _intersect(current, given[index])
            current = apply_split(current, split.get(index))
        bounds.append(current)
        current = _without_nan(ibp_step(op, current))
    return bounds


def _crown_preactivation(net: Sequence[RigorousOp], bounds: list[Box], pre: Box, max_elements: int) -> Box:
    """``pre`` intersected with rigorous CROWN bounds (rows +e_j and -e_j, in chunks) of its
    neurons that are unstable in some sample; earlier ReLUs take the adaptive slopes."""
    batch, shape = pre.lower.shape[0], tuple(pre.lower.shape[1:])
    lower, upper = pre.lower.flatten(1).clone(), pre.upper.flatten(1).clone()
    chosen = ((lower < 0) & (upper > 0)).any(dim=0).nonzero().squeeze(1)
    if chosen.numel() == 0:
        return pre
    widest = max(b.lower[0].numel() for b in [*bounds, pre])
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


def _price_splits(A: Tensor, beta: Tensor, sign: Tensor) -> Tensor:
    """fl(A - beta sgn) = A - beta' sgn with beta' >= 0 exactly (monotone rounding)."""
    return A - beta.to(A).clamp(min=0) * sign.to(A).unsqueeze(1)


def backward(net: Sequence[RigorousOp], bounds: Sequence[Box], A: Tensor, alphas: Mapping[int, Tensor] | None = None,
             betas: Mapping[int, Tensor] | None = None, split: Mapping[int, Tensor] | None = None,
             ) -> tuple[Tensor, Tensor]:
    """Move  C f(x) >= A . h_out(x)  (A (B or 1, S, *output shape)) from the output of ``net``
    (a prefix of the network: alphas, betas and split keyed by op index) to its input:
    returns (A_in, offset) with  C f(x) >= A_in . x + offset  on the domain, exactly.
    ``bounds[k]``: rigorous box of the input of net[k]; ``alphas``: lower slopes, each
    broadcastable to (B, S, *shape), clamped to [0, 1] (adaptive where missing); ``betas``
    (clamped >= 0) price the split constraints ``split`` as ``bab.split_bound`` does."""
    alphas, betas = alphas or {}, betas or {}
    offset = torch.zeros(A.shape[:2], dtype=A.dtype, device=A.device)
    for index in range(len(net) - 1, -1, -1):
        op, pre = net[index], bounds[index]
        if isinstance(op, (LinearOp, ConvOp)):
            A, offset = _backward_affine(op, A, offset, pre)
        elif isinstance(op, IntervalAffineOp):
            A, offset = _backward_interval_affine(op, A, offset, pre)
        elif isinstance(op, ReluOp):
            A, offset = _backward_relu(A, offset, pre, alphas.get(index))
            if index in betas:
                A = _price_splits(A, betas[index], split[index])
        else:
            A = A.reshape(A.shape[0], A.shape[1], *pre.lower.shape[1:])
    return A, offset


def concretize(A: Tensor, offset: Tensor, box: Box) -> Tensor:
    """A rigorous lower bound (B, S) of min over the box of A . x + offset:
    fl(A . c) - (|A| . (r + gamma_n |c|) + n eta) + offset, rounded down; NaN -> -inf."""
    center, radius = _center_radius(box)
    n = center[0].numel()
    width = inflate(radius + gamma(n) * center.abs())
    error = inflate(dot_upper(_abs_dot(A, width), n) + n * ETA)
    lower = next_down(next_down(_dot(A, center) - error) + offset)
    return lower.nan_to_num(-math.inf, math.inf, -math.inf)


def crown_lower(net: Sequence[RigorousOp], bounds: Sequence[Box], spec: Tensor,
                alphas: Mapping[int, Tensor] | None = None, betas: Mapping[int, Tensor] | None = None,
                split: Mapping[int, Tensor] | None = None) -> Tensor:
    """Rigorous CROWN lower bounds (B, S) of the spec rows (B or 1, S, *output shape) over the
    domain: ``backward`` then ``concretize`` over bounds[0]."""
    A, offset = backward(net, bounds, spec.double(), alphas, betas, split)
    return concretize(A, offset, bounds[0])


def ibp_lower(net: Sequence[RigorousOp], bounds: Sequence[Box], spec: Tensor) -> Tensor:
    """Rigorous IBP lower bounds (B, S) of the spec rows, like ``ibp.ibp_margin_lower``: the
    rows multiplied into a last Linear op (last-layer elision), else over the logits' box."""
    if isinstance(net[-1], LinearOp):
        return crown_lower(net[-1:], bounds[-1:], spec)
    logits = ibp_step(net[-1], bounds[-1])
    return concretize(spec.double(), torch.zeros(spec.shape[:2], dtype=torch.float64, device=spec.device), logits)
