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
* Flatten:                            A <- A reshaped to the input shape.
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

Pre-activation bounds (l, u) of every ReLU input are ``intermediate`` bounds, a dict from the
ReLU's op index to the Box of its input, passed in and returned as plain values:

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

from ..models.ops import ChannelAffineOp, ConvOp, FlattenOp, LinearOp, Op, ReluOp
from .box import Box
from .ibp import ibp_step
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
class BackwardContext:
    """What a backward rule needs besides the op: the per-sample shape of the op's input and,
    for a ReLU, its relaxation."""

    input_shape: tuple[int, ...]
    relaxation: ReluRelaxation | None = None


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


SHAPE_RULES: dict[type, Callable[[Op, tuple[int, ...]], tuple[int, ...]]] = {
    LinearOp: _shape_linear,
    ConvOp: _shape_conv,
    ChannelAffineOp: lambda op, shape: shape,
    ReluOp: lambda op, shape: shape,
    FlattenOp: lambda op, shape: (math.prod(shape),),
}


def layer_shapes(ops: Sequence[Op], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample shapes: result[k] is the shape of the input of ops[k]; result[-1] the output."""
    shapes = [tuple(input_shape)]
    for op in ops:
        shapes.append(tuple(SHAPE_RULES[type(op)](op, shapes[-1])))
    return shapes


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


def _backward_conv(op: ConvOp, bound: LinearBound, ctx: BackwardContext) -> LinearBound:
    A = bound.A
    batch, rows = A.shape[:2]
    out_channels, out_height, out_width = A.shape[2:]
    in_channels, in_height, in_width = ctx.input_shape
    kh, kw = op.weight.shape[2:]
    # conv_transpose2d yields (H_out - 1) s - 2 p + k rows; the forward conv dropped the last
    # (H_in + 2 p - k) mod s input rows, which output_padding gives back (as zeros of A).
    output_padding = tuple(
        size_in - ((size_out - 1) * stride - 2 * pad + kernel)
        for size_in, size_out, stride, pad, kernel in zip(
            (in_height, in_width), (out_height, out_width), op.stride, op.padding, (kh, kw)))
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


def _backward_flatten(op: FlattenOp, bound: LinearBound, ctx: BackwardContext) -> LinearBound:
    A = bound.A
    return LinearBound(A.reshape(A.shape[0], A.shape[1], *ctx.input_shape), bound.bias)


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
    FlattenOp: _backward_flatten,
    ReluOp: _backward_relu,
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


def backward(ops: Sequence[Op], bound: LinearBound, input_shape: tuple[int, ...],
             relaxations: Mapping[int, ReluRelaxation], after_relu: ReluHook | None = None) -> LinearBound:
    """Move a linear bound on the output of ``ops`` to their input (``input_shape`` per sample);
    ``relaxations[k]`` relaxes the ReLU ops[k]. Affine maps after a Linear/Conv are folded
    into it (``FOLD_RULES``). ``after_relu(k, A at the ReLU's output, bound at its input)``
    may adjust the bound right after each ReLU (branch and bound prices split constraints there)."""
    shapes = layer_shapes(ops, input_shape)
    index = len(ops) - 1
    while index >= 0:
        op = ops[index]
        if isinstance(op, ChannelAffineOp) and index > 0 and type(ops[index - 1]) in FOLD_RULES:
            index -= 1
            op = FOLD_RULES[type(ops[index])](ops[index], op)
        output_A = bound.A
        bound = BACKWARD_RULES[type(op)](op, bound, BackwardContext(shapes[index], relaxations.get(index)))
        if after_relu is not None and isinstance(op, ReluOp):
            bound = after_relu(index, output_A, bound)
        index -= 1
    return bound


def concretize_lower(bound: LinearBound, box: Box) -> Tensor:
    """min over the box of A . x + bias = A . c - |A| . r + bias, shape (B, S)."""
    A = bound.A.flatten(2)
    center = box.center.flatten(1).unsqueeze(-1)
    radius = box.radius.flatten(1).unsqueeze(-1)
    return A.matmul(center).squeeze(-1) - A.abs().matmul(radius).squeeze(-1) + bound.bias


# ----------------------------------------------------------------------------------------------
# Intermediate bounds


def ibp_is_exact(ops: Sequence[Op]) -> bool:
    """IBP is exact for at most one Linear/Conv composed with per-channel affine maps and
    flattens (|D1 W D2| = |D1| |W| |D2| for diagonal D), so CROWN cannot improve on it there."""
    if any(isinstance(op, ReluOp) for op in ops):
        return False
    return sum(isinstance(op, (LinearOp, ConvOp)) for op in ops) <= 1


def _crown_preactivation(ops: Sequence[Op], box: Box, relaxations: Mapping[int, ReluRelaxation],
                         pre: Box, unstable_only: bool, max_elements: int) -> Box:
    """CROWN bounds of the output of ``ops`` (a ReLU input whose IBP box is ``pre``),
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
    widest = max(math.prod(s) for s in layer_shapes(ops, tuple(box.lower.shape[1:])))
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


def relu_indices(ops: Sequence[Op]) -> list[int]:
    return [index for index, op in enumerate(ops) if isinstance(op, ReluOp)]


def intermediate_bounds(ops: Sequence[Op], box: Box, mode: str = "crown-ibp", *,
                        split: Splits | None = None, crown_layers: Collection[int] | None = None,
                        unstable_only: bool = True, max_elements: int = DEFAULT_MAX_ELEMENTS,
                        ) -> IntermediateBounds:
    """Boxes of every ReLU input, keyed by the ReLU's op index (module docstring).

    mode "ibp"/"crown-ibp": IBP; "crown": CROWN intersected with IBP for the ReLUs in
    ``crown_layers`` (op indices; None: all), IBP for the others. Splits tighten each box as
    soon as it is computed, so later layers profit from them."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    split = split or {}
    relus = relu_indices(ops)
    boxes: IntermediateBounds = {}
    relaxations: dict[int, ReluRelaxation] = {}
    current = box
    for index in range(relus[-1] + 1 if relus else 0):
        op = ops[index]
        if isinstance(op, ReluOp):
            pre = current
            if (mode == "crown" and (crown_layers is None or index in crown_layers)
                    and not ibp_is_exact(ops[:index])):
                pre = _crown_preactivation(ops[:index], box, relaxations, pre, unstable_only, max_elements)
            pre = apply_split(pre, split.get(index))
            boxes[index] = pre
            relaxations[index] = relu_relaxation(pre)
            current = pre
        current = ibp_step(op, current)
    return boxes


# ----------------------------------------------------------------------------------------------
# CROWN on a specification


def _spec_bound(spec_C: Tensor, box: Box) -> LinearBound:
    C = spec_C.to(dtype=box.lower.dtype, device=box.lower.device)
    if C.dim() == 2:
        C = C.unsqueeze(0)
    return LinearBound(C, torch.zeros(C.shape[:2], dtype=C.dtype, device=C.device))


def _check_intermediate(ops: Sequence[Op], intermediate: Mapping[int, Box]) -> None:
    missing = [index for index in relu_indices(ops) if index not in intermediate]
    if missing:
        raise KeyError(f"no intermediate bounds for the ReLU ops {missing}")


def crown_bounds(ops: Sequence[Op], box: Box, spec_C: Tensor, intermediate: Mapping[int, Box] | None = None,
                 alphas: Alphas | None = None, *, mode: str = "crown-ibp", split: Splits | None = None,
                 crown_layers: Collection[int] | None = None, unstable_only: bool = True,
                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> Tensor:
    """Lower bounds of C f(x) over the box, shape (B, S); ``spec_C`` is (B, S, K) or (S, K).

    ``intermediate``: ReLU-input boxes (see ``intermediate_bounds``, computed with ``mode``
    when None). ``alphas``: lower slopes per ReLU op index, each broadcastable to
    (B, S, *shape) (clamped to [0, 1]); missing ReLUs use the adaptive slope. ``split`` tightens
    the intermediate boxes. When the last op is Linear its backward rule multiplies the spec
    into the weights first (C W, C b): last-layer elision comes for free."""
    if intermediate is None:
        intermediate = intermediate_bounds(ops, box, mode, split=split, crown_layers=crown_layers,
                                           unstable_only=unstable_only, max_elements=max_elements)
    else:
        intermediate = apply_splits(intermediate, split)
    _check_intermediate(ops, intermediate)
    alphas = alphas or {}
    relaxations = {index: relu_relaxation(pre, alphas.get(index)) for index, pre in intermediate.items()}
    bound = backward(ops, _spec_bound(spec_C, box), tuple(box.lower.shape[1:]), relaxations)
    lower = concretize_lower(bound, box)
    return lower.expand(box.lower.shape[0], -1)


def crown_upper_bounds(ops: Sequence[Op], box: Box, spec_C: Tensor,
                       intermediate: Mapping[int, Box] | None = None, alphas: Alphas | None = None,
                       **options) -> Tensor:
    """Upper bounds of C f(x): minus the lower bounds of -C f(x)."""
    return -crown_bounds(ops, box, -spec_C, intermediate, alphas, **options)


def _other_classes(labels: Tensor, num_classes: int) -> Tensor:
    """(B, K-1): the classes other than each sample's label, in increasing order."""
    classes = torch.arange(num_classes, device=labels.device).expand(labels.shape[0], -1)
    return classes[classes != labels.unsqueeze(1)].view(labels.shape[0], num_classes - 1)


def crown_margin_lower(ops: Sequence[Op], box: Box, labels: Tensor, num_classes: int,
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


def crown_ibp_margin_lower(ops: Sequence[Op], box: Box, labels: Tensor, num_classes: int,
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


def alpha_crown(ops: Sequence[Op], box: Box, spec_C: Tensor, intermediate: Mapping[int, Box] | None = None,
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
    for index, pre in intermediate.items():
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


def alpha_crown_bounds(ops: Sequence[Op], box: Box, spec_C: Tensor, intermediate: Mapping[int, Box] | None = None,
                       iterations: int = 20, lr: float = 0.1, **options) -> Tensor:
    """The lower bounds (B, S) of ``alpha_crown``."""
    return alpha_crown(ops, box, spec_C, intermediate, iterations, lr, **options).lower
