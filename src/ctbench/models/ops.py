"""A network lowered to primitive operations that are plain values.

Every pass of ctbench (clean forward, attacks, IBP, CROWN) runs on the same lowered form, so
BatchNorm statistics are chosen once, when lowering, and never stored on modules:

* ``clean_forward`` runs the model on a clean batch and returns the batch statistics of every
  BatchNorm layer (with gradients);
* ``lower_network(model, bn_stats)`` turns each layer into an op; BatchNorm and the input
  normalization become a per-channel affine map using the statistics in force (the given
  clean-batch statistics, or the model's population/running statistics when none are given).

Adding a layer type is one ``LOWERINGS`` entry here plus one rule per bound domain.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Normalize


@dataclass(frozen=True, eq=False)
class LinearOp:
    weight: Tensor  # (out, in)
    bias: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True, eq=False)
class ConvOp:
    weight: Tensor  # (out, in, kh, kw)
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]

    def __call__(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


@dataclass(frozen=True, eq=False)
class ChannelAffineOp:
    """y = x * scale + shift per channel (dim 1): BatchNorm with fixed statistics, Normalize."""

    scale: Tensor  # (C,)
    shift: Tensor  # (C,)

    def broadcast(self, tensor: Tensor, ndim: int) -> Tensor:
        return tensor.view(1, -1, *([1] * (ndim - 2)))

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.broadcast(self.scale, x.dim()) + self.broadcast(self.shift, x.dim())


@dataclass(frozen=True, eq=False)
class ReluOp:
    def __call__(self, x: Tensor) -> Tensor:
        return torch.relu(x)


@dataclass(frozen=True, eq=False)
class FlattenOp:
    def __call__(self, x: Tensor) -> Tensor:
        return x.flatten(1)


Op = LinearOp | ConvOp | ChannelAffineOp | ReluOp | FlattenOp


@dataclass(frozen=True)
class BatchNormStats:
    """Mean and (biased) variance of the input of each BatchNorm layer, keyed by its index in
    the Sequential. Tensors keep their autograd history, so gradients flow through them."""

    per_layer: Mapping[int, tuple[Tensor, Tensor]]

    def detached(self) -> "BatchNormStats":
        return BatchNormStats({i: (m.detach(), v.detach()) for i, (m, v) in self.per_layer.items()})


def _maybe_detach(tensor: Tensor | None, detach: bool) -> Tensor | None:
    return tensor.detach() if (detach and tensor is not None) else tensor


def _lower_linear(layer: nn.Linear, stats, detach: bool) -> Op:
    return LinearOp(_maybe_detach(layer.weight, detach), _maybe_detach(layer.bias, detach))


def _lower_conv(layer: nn.Conv2d, stats, detach: bool) -> Op:
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
        raise ValueError(f"unsupported Conv2d {layer}: only groups=1, dilation=1, zero padding")
    if isinstance(layer.padding, str):
        raise ValueError(f"unsupported Conv2d {layer}: give padding as integers")
    return ConvOp(
        _maybe_detach(layer.weight, detach), _maybe_detach(layer.bias, detach),
        tuple(layer.stride), tuple(layer.padding),
    )


def _lower_batchnorm(layer: nn.modules.batchnorm._BatchNorm, stats, detach: bool) -> Op:
    if stats is None:
        if layer.running_mean is None:
            raise ValueError(f"{layer} tracks no running statistics and no batch statistics were given")
        mean, var = layer.running_mean, layer.running_var
    else:
        mean, var = stats
    weight = layer.weight if layer.affine else torch.ones_like(mean)
    bias = layer.bias if layer.affine else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + layer.eps)
    shift = bias - mean * scale
    return ChannelAffineOp(_maybe_detach(scale, detach), _maybe_detach(shift, detach))


def _lower_normalize(layer: Normalize, stats, detach: bool) -> Op:
    std = layer.std.flatten()
    return ChannelAffineOp(1.0 / std, -layer.mean.flatten() / std)


LOWERINGS: dict[type, Callable[..., Op | None]] = {
    nn.Linear: _lower_linear,
    nn.Conv2d: _lower_conv,
    nn.BatchNorm1d: _lower_batchnorm,
    nn.BatchNorm2d: _lower_batchnorm,
    Normalize: _lower_normalize,
    nn.ReLU: lambda layer, stats, detach: ReluOp(),
    nn.Flatten: lambda layer, stats, detach: FlattenOp(),
    # Identity-like layers vanish from the lowered network.
    nn.Identity: lambda layer, stats, detach: None,
    nn.Dropout: lambda layer, stats, detach: None,
}

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def _layers(model: nn.Module) -> Sequence[nn.Module]:
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"ctbench works on nn.Sequential models, got {type(model).__name__}")
    return list(model)


def lower_network(model: nn.Module, bn_stats: BatchNormStats | None = None, detach: bool = False,
                  fold: bool = False) -> tuple[Op, ...]:
    """Lower ``model`` to ops. BatchNorm uses ``bn_stats`` when given, else the model's
    running (population) statistics. ``detach`` cuts parameters out of the autograd graph, for
    passes (attacks) that need gradients only with respect to the input. ``fold`` merges each
    BatchNorm into the Linear/Conv before it (``fold_affine``)."""
    ops: list[Op] = []
    for index, layer in enumerate(_layers(model)):
        lowering = LOWERINGS.get(type(layer))
        if lowering is None:
            raise TypeError(f"layer {index} ({type(layer).__name__}) has no lowering; supported: "
                            + ", ".join(t.__name__ for t in LOWERINGS))
        stats = bn_stats.per_layer.get(index) if (bn_stats is not None and isinstance(layer, BATCHNORM_TYPES)) else None
        if bn_stats is not None and isinstance(layer, BATCHNORM_TYPES) and stats is None:
            raise KeyError(f"no batch statistics for BatchNorm layer {index}")
        op = lowering(layer, stats, detach)
        if op is not None:
            ops.append(op)
    return fold_affine(ops) if fold else tuple(ops)


def _fold(op: Op, affine: ChannelAffineOp) -> Op:
    """affine(op(x)) as one op: W' = s W (per output channel), b' = s b + t."""
    scale = affine.scale.view(-1, *([1] * (op.weight.dim() - 1)))
    bias = affine.shift if op.bias is None else op.bias * affine.scale + affine.shift
    return dataclasses.replace(op, weight=op.weight * scale, bias=bias)


def fold_affine(ops: Sequence[Op]) -> tuple[Op, ...]:
    """Fold every per-channel affine op (BatchNorm with fixed statistics) that follows a Linear
    or Conv into its weights: the same function with fewer passes over the activations.
    Differentiable: gradients reach the weights, the BatchNorm parameters and statistics."""
    folded: list[Op] = []
    for op in ops:
        if isinstance(op, ChannelAffineOp) and folded and isinstance(folded[-1], (LinearOp, ConvOp)):
            folded[-1] = _fold(folded[-1], op)
        elif isinstance(op, ChannelAffineOp) and _is_identity(op):
            continue  # e.g. the normalization under data.normalize=false (mean 0, std 1)
        else:
            folded.append(op)
    return tuple(folded)


def _is_identity(op: ChannelAffineOp) -> bool:
    return not op.scale.requires_grad and bool((op.scale == 1).all() and (op.shift == 0).all())


def run_ops(ops: Sequence[Op], x: Tensor) -> Tensor:
    for op in ops:
        x = op(x)
    return x


def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but the channel dim 1."""
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    return mean, var


Statistics = Callable[[Tensor], tuple[Tensor, Tensor]]


def clean_forward(model: nn.Module, x: Tensor,
                  statistics: Statistics = batch_statistics) -> tuple[Tensor, BatchNormStats]:
    """Forward pass in training mode: every BatchNorm normalizes with the statistics of this
    batch. Returns the logits and those statistics, to be reused by every other pass of the step.
    ``statistics`` maps a BatchNorm input to its per-channel mean and biased variance: this
    batch's own by default; in data-parallel training, those of the global batch over all ranks."""
    stats: dict[int, tuple[Tensor, Tensor]] = {}
    for index, layer in enumerate(_layers(model)):
        if isinstance(layer, BATCHNORM_TYPES):
            stats[index] = statistics(x)
            x = _lower_batchnorm(layer, stats[index], detach=False)(x)
        else:
            x = layer(x)
    return x, BatchNormStats(stats)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, BATCHNORM_TYPES) for m in model.modules())
