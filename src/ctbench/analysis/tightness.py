"""Propagation tightness (Mao et al. 2024, "Understanding certified training with interval
bound propagation"; paper section 5.4).

With every ReLU fixed to its activation pattern at the clean input x (D_k = diag(1[h_k(x) > 0]),
population BatchNorm statistics), the network is the linear map

    M = C W_L D_{L-1} W_{L-1} ... D_1 W_1

(normalization and BatchNorm are per-channel diagonal maps inside the W's). For an L_inf box
of radius eps, the tightest box of the linearized network has radius |M| 1 eps (product, then
abs), while IBP on the linearized network gives |C W_L| D |W_{L-1}| ... D |W_1| 1 eps (abs,
then product). Propagation tightness is their ratio, per output row:

    tau_j = (|M| 1)_j / (|C W_L| D ... D |W_1| 1)_j  in [0, 1]        (eps cancels)

For the final layer the rows of C are the margins e_y - e_i, i != y (multiplied into the last
linear layer, as ctbench's IBP does: last-layer elision); tau is averaged over the margins of a
sample, then over samples. For a hidden layer k (``per_layer``) the sub-network is the one up to
the pre-activation of the k-th ReLU, C = I, rows are neurons; at most ``max_neurons`` neurons
per layer are drawn (seeded, the same for every sample) to bound the cost.

The abs is taken per op, as ctbench's IBP propagates radii; per-channel affine maps are
diagonal, so |D1 W D2| = |D1| |W| |D2| and folding them into the neighbouring weights changes
nothing. Rows whose IBP radius is 0 (every path switched off) have no defined ratio and are
left out of the averages.

No dense matrix is formed: the rows of M are vector-Jacobian products through the fixed-pattern
network (``backward_rows``: linear rows A <- A W, conv rows through the adjoint of the
convolution, diagonal maps elementwise), and the denominator is the same backward pass with
|W| and nonnegative rows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..models.ops import ChannelAffineOp, ConvOp, FlattenOp, LinearOp, Op, ReluOp, require_chain
from .utilization import (ANALYSIS_OPS, ModelOrOps, active_masks, as_ops, layer_names, ops_dtype_device,
                          relu_indices, to_float_images)

# A ReLU rule of a backward pass: (ReLU op index, rows A (B, R, *shape), bias (B, R) or None)
# -> (new A, new bias).
ReluRule = Callable[[int, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def input_shapes(ops: Sequence[Op], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-sample shape of the input of every op, and last the shape of the network output."""
    dtype, device = ops_dtype_device(ops)
    x = torch.zeros((1, *input_shape), dtype=dtype, device=device)
    shapes = []
    with torch.no_grad():
        for op in ops:
            shapes.append(tuple(x.shape[1:]))
            x = op(x)
    shapes.append(tuple(x.shape[1:]))
    return shapes


def _channel_view(vector: Tensor, ndim: int) -> Tensor:
    """A per-channel vector shaped to broadcast against rows A (B, R, C, ...)."""
    return vector.view(1, 1, -1, *([1] * (ndim - 3)))


def backward_rows(ops: Sequence[Op], shapes: Sequence[tuple[int, ...]], rows: Tensor,
                  relu_rule: ReluRule, absolute: bool = False, bias: Tensor | None = None,
                  ) -> tuple[Tensor, Tensor | None]:
    """Move linear rows from the output of ``ops`` to their input: rows A (B, R, *output shape)
    become A J (B, R, *input shape) where J is the Jacobian of the network with each ReLU
    replaced by ``relu_rule``. ``absolute`` uses |W| and |scale| (the IBP radius map).
    ``bias`` (B, R), when given, accumulates A b for every affine op (CROWN bounds).

    ``shapes`` are the input shapes of ``ops`` (``input_shapes``)."""
    A = rows
    for index in range(len(ops) - 1, -1, -1):
        op = ops[index]
        in_shape = shapes[index]
        batch, count = A.shape[:2]
        if isinstance(op, LinearOp):
            weight = op.weight.abs() if absolute else op.weight
            if bias is not None and op.bias is not None:
                bias = bias + A @ op.bias
            A = A @ weight
        elif isinstance(op, ConvOp):
            weight = op.weight.abs() if absolute else op.weight
            if bias is not None and op.bias is not None:
                bias = bias + A.sum(dim=(-2, -1)) @ op.bias
            flat = A.reshape(batch * count, *A.shape[2:])
            A = torch.nn.grad.conv2d_input((batch * count, *in_shape), weight, flat, op.stride, op.padding)
            A = A.reshape(batch, count, *in_shape)
        elif isinstance(op, ChannelAffineOp):
            scale = op.scale.abs() if absolute else op.scale
            if bias is not None:
                bias = bias + (A * _channel_view(op.shift, A.dim())).flatten(2).sum(-1)
            A = A * _channel_view(scale, A.dim())
        elif isinstance(op, FlattenOp):
            A = A.reshape(batch, count, *in_shape)
        elif isinstance(op, ReluOp):
            A, bias = relu_rule(index, A, bias)
        else:
            raise TypeError(f"no backward rule for {type(op).__name__}")
    return A, bias


def pattern_rule(masks: dict[int, Tensor]) -> ReluRule:
    """ReLU fixed to an activation pattern: rows are multiplied by D = diag(mask) per sample."""

    def rule(index: int, A: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return A * masks[index].unsqueeze(1).to(A.dtype), bias

    return rule


def margin_rows(labels: Tensor, num_classes: int, dtype: torch.dtype, device) -> Tensor:
    """C (B, K-1, K): rows e_y - e_i for the classes i != y, in increasing order of i."""
    eye = torch.eye(num_classes, dtype=dtype, device=device)
    classes = torch.arange(num_classes, device=device).expand(len(labels), -1)
    others = classes[classes != labels.unsqueeze(1)].view(len(labels), num_classes - 1)
    return eye[labels].unsqueeze(1) - eye[others]


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """Per-row numerator / denominator; NaN where the denominator is 0."""
    safe = denominator > 0
    return torch.where(safe, numerator / torch.where(safe, denominator, torch.ones_like(denominator)),
                       torch.full_like(numerator, float("nan")))


def tightness_rows(ops: Sequence[Op], x: Tensor, rows: Tensor, masks: dict[int, Tensor] | None = None,
                   elide_last: bool = True) -> Tensor:
    """Propagation tightness of each row of ``rows`` (B, R, *output shape of ops) for the
    network ``ops`` linearized at ``x``: (|rows J| 1) / (IBP radius of the rows), shape (B, R),
    NaN where the IBP radius is 0.

    ``elide_last``: when the last op is Linear, the rows are multiplied into it before the abs
    (|C W_L|, ctbench's last-layer elision); otherwise abs is taken per op from the start."""
    shapes = input_shapes(ops, x.shape[1:])
    if masks is None:
        masks = active_masks(ops, x)
    rule = pattern_rule(masks)
    with torch.no_grad():
        exact, _ = backward_rows(ops, shapes, rows, rule)
        numerator = exact.abs().flatten(2).sum(-1)
        if elide_last and isinstance(ops[-1], LinearOp):
            start = (rows @ ops[-1].weight).abs()
            radius, _ = backward_rows(ops[:-1], shapes[:-1], start, rule, absolute=True)
        else:
            radius, _ = backward_rows(ops, shapes, rows.abs(), rule, absolute=True)
        denominator = radius.flatten(2).sum(-1)
    return _ratio(numerator, denominator)


@dataclass(frozen=True)
class TightnessResult:
    """Propagation tightness averaged over samples (``final``: over the margins of each sample
    first); ``per_sample`` the per-sample final values; ``per_layer`` per ReLU layer (the
    pre-activation of each ReLU, averaged over the drawn neurons, then samples)."""

    samples: int
    final: float
    per_sample: list[float]
    layer_names: list[str]
    per_layer: list[float] | None
    neurons_per_layer: list[int] | None

    def as_dict(self) -> dict:
        return asdict(self)


def _nanmean(values: Tensor, dim: int) -> Tensor:
    return torch.nanmean(values, dim=dim)


def propagation_tightness(model_or_ops: ModelOrOps, images: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                          *, per_layer: bool = True, max_neurons: int = 64,
                          generator: torch.Generator | None = None, batch_size: int = 16) -> TightnessResult:
    """Propagation tightness of a model at the given clean inputs (module docstring).

    Args:
        model_or_ops: an ``nn.Sequential`` ctbench model (population BatchNorm statistics are
            used) or its lowered ops; the last op should be the Linear classifier.
        images: (N, C, H, W), uint8 or floats in [0, 1]; labels: (N,) class indices.
        per_layer: also compute the tightness of every ReLU layer's pre-activation.
        max_neurons: neurons drawn per layer for ``per_layer`` (all when the layer has fewer).
        generator: torch generator for the draw of neurons (seeded for reproducibility).
        batch_size: samples per backward pass (memory grows with batch x rows x layer size).
    """
    ops = require_chain(as_ops(model_or_ops), ANALYSIS_OPS, "the tightness analysis")
    dtype, device = ops_dtype_device(ops)
    labels = torch.as_tensor(np.asarray(labels) if isinstance(labels, np.ndarray) else labels).long().to(device)
    count = len(images)
    if count == 0:
        raise ValueError("no images given")
    relus = relu_indices(ops)
    shapes = input_shapes(ops, tuple(images.shape[1:]))
    num_classes = int(np.prod(shapes[-1]))
    chosen: dict[int, Tensor] = {}
    if per_layer:
        for index in relus:
            size = int(np.prod(shapes[index]))
            if size <= max_neurons:
                chosen[index] = torch.arange(size)
            else:
                chosen[index] = torch.randperm(size, generator=generator)[:max_neurons].sort().values
    per_sample: list[Tensor] = []
    layer_values: dict[int, list[Tensor]] = {index: [] for index in chosen}
    for start in range(0, count, batch_size):
        x = to_float_images(images[start:start + batch_size], dtype, device)
        y = labels[start:start + batch_size]
        masks = active_masks(ops, x)
        C = margin_rows(y, num_classes, dtype, device)
        per_sample.append(_nanmean(tightness_rows(ops, x, C, masks), dim=1).cpu())
        for index, neurons in chosen.items():
            size = int(np.prod(shapes[index]))
            rows = torch.zeros(len(x), len(neurons), size, dtype=dtype, device=device)
            rows[:, torch.arange(len(neurons), device=device), neurons.to(device)] = 1.0
            rows = rows.reshape(len(x), len(neurons), *shapes[index])
            sub_masks = {i: m for i, m in masks.items() if i < index}
            values = tightness_rows(ops[:index], x, rows, sub_masks, elide_last=False)
            layer_values[index].append(_nanmean(values, dim=1).cpu())
    samples = torch.cat(per_sample)
    layers = None
    if per_layer:
        layers = [float(_nanmean(torch.cat(layer_values[index]), dim=0)) for index in relus]
    return TightnessResult(count, float(_nanmean(samples, dim=0)), samples.tolist(), layer_names(ops), layers,
                           [len(chosen[index]) for index in relus] if per_layer else None)
